"""The recipe's ``validate.devices`` entries (edgeprep.recipe imports this): which boards to
profile every artifact on, over SSH, and how to reach them; or which CPU families to emulate
(emu://<family>, emulate.py); or `native`, the host itself (already measured: listed, not rerun)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeprep.errors import BadInputError
from edgeprep.remote.emulate import NATIVE, EmulatedDevice, NativeDevice, family_from_url, is_emulated_url
from edgeprep.remote.ssh import Device, parse_url

SSH_ONLY = ("identity", "remote_python", "known_hosts", "accept_new_host_key", "connect_timeout_s", "remote_tmp",
            "ssh_options")


class DeviceConfig(BaseModel):
    """A remote device every artifact is also profiled on (edgeprep/remote/). A plain string is
    taken as the url. Relative key / known_hosts paths resolve against the recipe's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str  # ssh://[user@]host[:port], emu://<family>, or native
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # label in the report
    identity: Optional[str] = None  # private key file; default: ssh's agent and ~/.ssh
    remote_python: str = "python3"
    known_hosts: Optional[str] = None  # default: ~/.ssh/known_hosts
    accept_new_host_key: bool = False  # record a new host's key (a changed key is still refused)
    connect_timeout_s: int = Field(10, ge=1)
    timeout_s: int = Field(600, ge=1)
    remote_tmp: Optional[str] = None
    ssh_options: list[str] = Field(default_factory=list)  # extra -o KEY=VALUE, e.g. ProxyJump=bastion

    @model_validator(mode="before")
    @classmethod
    def _url_shorthand(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _device_url(cls, v: str) -> str:
        try:
            if is_emulated_url(v):
                family_from_url(v)
            elif v != NATIVE:
                parse_url(v)
        except BadInputError as exc:
            raise ValueError(f"{exc} (or emu://<family>, or native)" if not is_emulated_url(v) else str(exc)) from None
        return v

    @model_validator(mode="after")
    def _no_ssh_fields_elsewhere(self) -> "DeviceConfig":
        if self.url.startswith("ssh://"):
            return self
        # a field at its default is not a choice: a resolved recipe (run dir's recipe.yaml, used by
        # --resume) writes every field back out
        changed = {f for f in self.model_fields_set
                   if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)}
        given = [f for f in SSH_ONLY if f in changed]
        if given:
            raise ValueError(f"device {self.url}: {', '.join(given)} apply to ssh:// devices only; remove them")
        if self.url == NATIVE and "timeout_s" in changed:
            raise ValueError("device native: timeout_s does not apply (nothing runs again); remove it")
        return self

    def to_device(self, base_dir: Path) -> "Device | EmulatedDevice | NativeDevice":
        if self.url == NATIVE:
            return NativeDevice(name=self.name or "")
        if is_emulated_url(self.url):
            return EmulatedDevice(url=self.url, name=self.name or "", timeout_s=self.timeout_s)
        def local(p: Optional[str]) -> Optional[Path]:
            return None if p is None else (base_dir / Path(p).expanduser())
        return Device(url=self.url, name=self.name or "", identity=local(self.identity),
                      remote_python=self.remote_python, known_hosts=local(self.known_hosts),
                      accept_new_host_key=self.accept_new_host_key, connect_timeout_s=self.connect_timeout_s,
                      timeout_s=self.timeout_s, remote_tmp=self.remote_tmp, ssh_options=tuple(self.ssh_options))

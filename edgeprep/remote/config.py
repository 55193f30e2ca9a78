"""The recipe's ``validate.devices`` entries (edgeprep.recipe imports this): which boards to
profile every artifact on, over SSH, and how to reach them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeprep.errors import BadInputError
from edgeprep.remote.ssh import Device, parse_url


class DeviceConfig(BaseModel):
    """A remote device every artifact is also profiled on (edgeprep/remote/). A plain string is
    taken as the url. Relative key / known_hosts paths resolve against the recipe's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str  # ssh://[user@]host[:port]
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
    def _ssh_url(cls, v: str) -> str:
        try:
            parse_url(v)
        except BadInputError as exc:
            raise ValueError(str(exc)) from None
        return v

    def to_device(self, base_dir: Path) -> Device:
        def local(p: Optional[str]) -> Optional[Path]:
            return None if p is None else (base_dir / Path(p).expanduser())
        return Device(url=self.url, name=self.name or "", identity=local(self.identity),
                      remote_python=self.remote_python, known_hosts=local(self.known_hosts),
                      accept_new_host_key=self.accept_new_host_key, connect_timeout_s=self.connect_timeout_s,
                      timeout_s=self.timeout_s, remote_tmp=self.remote_tmp, ssh_options=tuple(self.ssh_options))

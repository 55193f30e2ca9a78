"""ExecuTorch target: .pte lowered to XNNPACK, run by ExecuTorch's own runtime on this CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="the executorch extra is not installed: pip install 'edgeprep[executorch]'")

from edgeprep.errors import RuntimeFailure  # noqa: E402
from edgeprep.exporters import get_exporter, get_runtime  # noqa: E402
from edgeprep.exporters.executorch import ExecuTorchOptions, quantize_int8  # noqa: E402
from edgeprep.measure.parity import sqnr_db  # noqa: E402
from edgeprep.models.vit import ViT  # noqa: E402
from edgeprep.reparam.fold import export_form  # noqa: E402
from edgeprep.reparam.surgery import reparam_model  # noqa: E402
from edgeprep.validate import run_batched  # noqa: E402


def _vit() -> ViT:
    torch.manual_seed(0)
    return ViT(image_size=16, patch_size=4, in_chans=1, num_classes=5, dim=32, depth=2, heads=2, mlp_ratio=2).eval()


def _torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = _vit()
    art = get_exporter("executorch").export(model, (torch.randn(2, 1, 16, 16),),
                                           tmp_path_factory.mktemp("et") / "fp32", ExecuTorchOptions())
    return model, art


def test_fp32_pte_matches_pytorch_in_static_batches(fp32):
    model, art = fp32
    assert art.path.name == "model.pte" and (art.dir / "program.pt2").is_file()
    assert art.inputs[0].shape == (1, 1, 16, 16) and art.info["batch"] == 1
    loaded = get_runtime("executorch").load(art)
    assert loaded.fixed_batch == 1
    x = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)
    assert sqnr_db(_torch(model, x), run_batched(loaded, x)) >= 30.0  # measured ~125 dB
    with pytest.raises(RuntimeFailure, match="ExecuTorch failed"):  # a static program: batch 3 is refused
        loaded.run([x[:3]])
    stats = loaded.profile([x[:1]], warmup=2, iters=5)
    assert stats.p50_ms > 0 and stats.batch == 1


def test_layernorm_stays_outside_xnnpack_and_prepbn_folding_removes_it(fp32):
    """XNNPACK takes no native_layer_norm: each LayerNorm is a hand-over to the portable kernels.
    After PRepBN is folded away none is left and XNNPACK takes more of the graph."""
    _, art = fp32
    ln = art.info["xnnpack"]
    assert ln["ops_outside_delegates"]["native_layer_norm"] == 2 * 2 + 1  # norm1, norm2 per block + final
    assert ln["partitions"] >= 2
    model = _vit()
    reparam_model(model, "prepbn", "keep", 0, 0)  # lam = 0 at once: the folded form exists
    example = (torch.randn(2, 1, 16, 16),)
    folded = export_form(model.eval(), example)
    art2 = get_exporter("executorch").export(folded, example, art.dir.parent / "prepbn", ExecuTorchOptions())
    bn = art2.info["xnnpack"]
    assert "native_layer_norm" not in bn["ops_outside_delegates"]
    assert bn["partitions"] < ln["partitions"]
    assert sum(bn["ops_outside_delegates"].values()) < sum(ln["ops_outside_delegates"].values())
    x = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
    got = run_batched(get_runtime("executorch").load(art2), x)
    assert sqnr_db(_torch(model, x), got) >= 30.0


def test_int8_peer_matches_its_pytorch_quantized_program(fp32):
    model, art = fp32
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((32, 1, 16, 16)).astype(np.float32)
    q = quantize_int8(art, [calib], art.dir.parent / "int8")
    assert q.role == "ptq" and q.info["calibration_rows"] == 32 and q.info["xnnpack"]["partitions"] >= 1
    x = rng.standard_normal((40, 1, 16, 16)).astype(np.float32)
    reference = torch.export.load(str(q.dir / "program.pt2")).module()
    with torch.no_grad():
        ref = np.concatenate([reference(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    got = run_batched(get_runtime("executorch").load(q), x)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.99
    assert sqnr_db(ref, got) >= 30.0
    fp = _torch(model, x)
    assert 10.0 <= sqnr_db(fp, got) < sqnr_db(ref, got)  # really quantized: closer to its int8 reference than to fp32

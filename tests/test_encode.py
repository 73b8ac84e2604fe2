"""encode: VaeEncoder on the tiny VAE on the CPU: modes, seeding, flip, and the non-finite and OOM guards."""

from __future__ import annotations

import copy
import weakref
from types import SimpleNamespace

import pytest
import torch

from cachebuild import encode
from cachebuild.config import DType, LatentsMode, ModelSpec
from cachebuild.encode import GuardedForward, is_out_of_memory, pick_device, resolve_dtype
from cachebuild.families.vae import VaeEncoder, VaeFamily, family_of
from cachebuild.hub import resolve_vae
from cachebuild.testing import make_tiny_taesd

CPU = torch.device("cpu")
FAMILY = VaeFamily("AutoencoderKL", latent_channels=4, downsample=2, scaling_factor=0.13025, shift_factor=None)
H, W = 16, 24  # small bucket; latents are (4, 8, 12)


@pytest.fixture(scope="module")
def vae(tiny_vae):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_vae).eval().requires_grad_(False)


def make_pixels(n: int, seed: int = 0, h: int = H, w: int = W) -> torch.Tensor:
    """(n, h, w, 3) uint8 noise, as the loader hands it over."""
    return torch.randint(0, 256, (n, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def bright(pixels: torch.Tensor, i: int) -> torch.Tensor:
    """Make image ``i`` nearly white: the test VAEs below misbehave on bright images."""
    pixels = pixels.clone()
    pixels[i] = 250
    return pixels


def direct(vae, pixels: torch.Tensor):
    """The posterior straight from diffusers, for comparison."""
    with torch.no_grad():
        x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
        return vae.encode(x).latent_dist


def encoder(vae, mode=LatentsMode.MEAN, flip=False, seed=0, dtype=DType.FP32, family=FAMILY) -> VaeEncoder:
    return VaeEncoder(vae, family, CPU, dtype, mode, flip, seed)


def latents(results, name: str = "latents") -> list[torch.Tensor]:
    assert all(r.tensors is not None for r in results), [r.reason for r in results]
    return [r.tensors[name] for r in results]


# -- modes --------------------------------------------------------------------------------------------


def test_mean_mode_equals_the_posterior_mean(vae):
    pixels = make_pixels(3)
    results = encoder(vae).encode(["a", "b", "c"], pixels)
    expected = direct(vae, pixels).mean
    assert len(results) == 3
    for i, r in enumerate(results):
        assert set(r.tensors) == {"latents"} and r.reason is None and not r.upcast
        t = r.tensors["latents"]
        assert t.shape == (4, H // 2, W // 2) and t.dtype == torch.float32 and t.device.type == "cpu"
        torch.testing.assert_close(t, expected[i], atol=1e-5, rtol=0)


def test_moments_mode_gives_mean_and_std(vae):
    pixels = make_pixels(2, seed=1)
    results = encoder(vae, LatentsMode.MOMENTS).encode(["a", "b"], pixels)
    dist = direct(vae, pixels)
    for i, r in enumerate(results):
        assert set(r.tensors) == {"mean", "std"}
        torch.testing.assert_close(r.tensors["mean"], dist.mean[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(r.tensors["std"], dist.std[i], atol=1e-5, rtol=1e-5)
        assert (r.tensors["std"] > 0).all()


def test_sample_mode_is_seeded_per_key_not_per_batch(vae):
    pixels = make_pixels(3, seed=2)
    alone = latents(encoder(vae, LatentsMode.SAMPLE).encode(["a"], pixels[1:2]))[0]
    in_batch = latents(encoder(vae, LatentsMode.SAMPLE).encode(["x", "a", "y"], pixels))[1]
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
    again = latents(encoder(vae, LatentsMode.SAMPLE).encode(["a"], pixels[1:2]))[0]
    assert torch.equal(alone, again)


def test_sample_mode_draws_differ_by_key_and_seed(vae):
    pixels = make_pixels(1, seed=3).repeat(2, 1, 1, 1)  # identical images
    a, b = latents(encoder(vae, LatentsMode.SAMPLE).encode(["a", "b"], pixels))
    assert not torch.allclose(a, b)
    a_seed1 = latents(encoder(vae, LatentsMode.SAMPLE, seed=1).encode(["a"], pixels[:1]))[0]
    assert not torch.allclose(a, a_seed1)


def test_sample_mode_is_mean_plus_std_times_unit_noise(vae):
    pixels = make_pixels(1, seed=4, h=64, w=64)
    sample = latents(encoder(vae, LatentsMode.SAMPLE).encode(["k"], pixels))[0]
    dist = direct(vae, pixels)
    z = (sample - dist.mean[0]) / dist.std[0]  # 4 * 32 * 32 standard normal draws
    assert abs(z.mean().item()) < 0.1
    assert 0.9 < z.std().item() < 1.1


def test_flip_stores_the_mirrored_image_latents(vae):
    pixels = make_pixels(2, seed=5)
    results = encoder(vae, flip=True).encode(["a", "b"], pixels)
    plain, mirrored = direct(vae, pixels).mean, direct(vae, pixels.flip(2)).mean
    for i, r in enumerate(results):
        assert set(r.tensors) == {"latents", "latents_flipped"}
        torch.testing.assert_close(r.tensors["latents"], plain[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(r.tensors["latents_flipped"], mirrored[i], atol=1e-5, rtol=0)
    assert not torch.allclose(results[0].tensors["latents"], results[0].tensors["latents_flipped"])


def test_flip_with_moments_and_sample(vae):
    pixels = make_pixels(1, seed=6)
    (moments,) = encoder(vae, LatentsMode.MOMENTS, flip=True).encode(["a"], pixels)
    assert set(moments.tensors) == {"mean", "std", "mean_flipped", "std_flipped"}
    (sample,) = encoder(vae, LatentsMode.SAMPLE, flip=True).encode(["a"], pixels)
    assert set(sample.tensors) == {"latents", "latents_flipped"}


def test_autoencoder_tiny_returns_latents_directly(tmp_path):
    from diffusers import AutoencoderTiny

    folder = make_tiny_taesd(tmp_path / "taesd")
    family = family_of(resolve_vae(ModelSpec(vae=str(folder))), None)
    model = AutoencoderTiny.from_pretrained(folder).eval()
    pixels = make_pixels(2, seed=7, h=32, w=48)
    results = encoder(model, LatentsMode.MEAN, family=family).encode(["a", "b"], pixels)
    with torch.no_grad():
        expected = model.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).latents
    for i, t in enumerate(latents(results)):
        assert t.shape == (4, 4, 6)
        torch.testing.assert_close(t, expected[i], atol=1e-5, rtol=0)


# -- the non-finite guard -------------------------------------------------------------------------


class OverflowingVae(torch.nn.Module):
    """Wraps a VAE; bright images give NaN, when the weights are not fp32 (like the original SDXL VAE in
    fp16) or always (``always=True``, a broken model)."""

    def __init__(self, inner, always: bool = False):
        super().__init__()
        self.inner = inner
        self.always = always
        self.calls: list[tuple[int, torch.dtype]] = []

    def encode(self, x):
        weights = next(self.inner.parameters()).dtype
        self.calls.append((len(x), weights))
        out = self.inner.encode(x)
        if weights == torch.float32 and not self.always:
            return out
        params = out.latent_dist.parameters.clone()
        params[x.float().mean(dim=(1, 2, 3)) > 0.9] = float("nan")
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=params))


def test_non_finite_fp16_output_is_redone_in_fp32(vae):
    wrapped = OverflowingVae(copy.deepcopy(vae)).to(torch.float16)
    rounded = copy.deepcopy(vae).half().float()  # what the fp32 redo computes with: fp16-rounded weights
    pixels = bright(make_pixels(4, seed=8), 2)
    enc = encoder(wrapped, dtype=DType.FP16)
    results = enc.encode(["a", "b", "c", "d"], pixels)

    assert enc.upcasts == 1
    assert wrapped.calls == [(4, torch.float16), (1, torch.float32)]  # only the bad image went again
    assert next(wrapped.parameters()).dtype == torch.float16  # the model is back in the run's dtype
    out = latents(results)
    assert all(torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out[2], direct(rounded, pixels[2:3]).mean[0], atol=1e-5, rtol=0)
    for i in (0, 1, 3):  # the others keep their fp16 results
        torch.testing.assert_close(out[i], direct(rounded, pixels[i : i + 1]).mean[0], atol=2e-2, rtol=2e-2)


def test_still_non_finite_in_fp32_fails_that_item_only(vae):
    wrapped = OverflowingVae(copy.deepcopy(vae), always=True).to(torch.float16)
    pixels = bright(make_pixels(3, seed=9), 0)
    enc = encoder(wrapped, dtype=DType.FP16)
    results = enc.encode(["a", "b", "c"], pixels)
    assert enc.upcasts == 1
    assert results[0].tensors is None
    assert "non-finite" in results[0].reason and "fp32" in results[0].reason
    assert results[1].tensors is not None and results[2].tensors is not None


def test_non_finite_in_fp32_run_fails_without_redo(vae):
    wrapped = OverflowingVae(vae, always=True)
    pixels = bright(make_pixels(2, seed=10), 1)
    enc = encoder(wrapped, dtype=DType.FP32)
    results = enc.encode(["a", "b"], pixels)
    assert enc.upcasts == 0 and wrapped.calls == [(2, torch.float32)]
    assert results[0].tensors is not None
    assert results[1].tensors is None and "non-finite" in results[1].reason


# -- the out-of-memory guard --------------------------------------------------------------------------


def oom_when(predicate):
    """A stand-in for VaeEncoder._raw that raises CUDA OOM when ``predicate(pixels)`` holds."""
    original = VaeEncoder._raw

    def raw(self, pixels, dtype):
        if predicate(pixels):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, pixels, dtype)

    return raw


def test_oom_splits_the_batch_until_it_fits(vae, monkeypatch):
    pixels = make_pixels(5, seed=11)
    keys = ["a", "b", "c", "d", "e"]
    reference = latents(encoder(vae, LatentsMode.SAMPLE).encode(keys, pixels))
    monkeypatch.setattr(VaeEncoder, "_raw", oom_when(lambda px: len(px) > 1))
    enc = encoder(vae, LatentsMode.SAMPLE)
    out = latents(enc.encode(keys, pixels))
    assert enc.oom_splits == 4  # 5 -> 2 + 3 -> 1 + 1, 1 + 2 -> 1 + 1
    for got, want in zip(out, reference, strict=True):  # same order, same values
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_oom_split_with_flip(vae, monkeypatch):
    pixels = make_pixels(3, seed=12)
    reference = encoder(vae, flip=True).encode(["a", "b", "c"], pixels)
    monkeypatch.setattr(VaeEncoder, "_raw", oom_when(lambda px: len(px) > 2))
    enc = encoder(vae, flip=True)
    results = enc.encode(["a", "b", "c"], pixels)
    assert enc.oom_splits == 2  # once for the batch, once for its mirror
    for got, want in zip(results, reference, strict=True):
        for name in ("latents", "latents_flipped"):
            torch.testing.assert_close(got.tensors[name], want.tensors[name], atol=1e-5, rtol=0)


def test_image_that_does_not_fit_alone_fails_and_the_rest_encode(vae, monkeypatch):
    pixels = bright(make_pixels(4, seed=13), 1)
    reference = latents(encoder(vae).encode(["a", "b", "c", "d"], pixels[[0, 0, 2, 3]]))
    too_big = lambda px: len(px) > 1 or bool((px.float().mean(dim=(1, 2, 3)) > 240).any())  # noqa: E731
    monkeypatch.setattr(VaeEncoder, "_raw", oom_when(too_big))
    enc = encoder(vae)
    results = enc.encode(["a", "b", "c", "d"], pixels)
    assert results[1].tensors is None
    assert "memory" in results[1].reason
    assert enc.oom_splits > 0
    for i in (0, 2, 3):
        assert results[i].reason is None
        torch.testing.assert_close(results[i].tensors["latents"], reference[i], atol=1e-5, rtol=0)


def identity_forward(inputs, dtype):
    """One float32 CPU output per item, as a GuardedForward forward returns them."""
    return [x.float() for x in inputs[0]]


def test_oom_recovery_runs_after_the_failed_attempt_has_let_go_of_its_tensors():
    attempts = []  # weak references to the activations of attempts that ran out of memory

    def forward(inputs, dtype):
        if any(ref() is not None for ref in attempts):  # a real allocator has no room while they are alive
            raise torch.OutOfMemoryError("CUDA out of memory: the last attempt's tensors are still held")
        activations = torch.zeros(len(inputs[0]), 256)  # allocated before the device gives up
        if len(inputs[0]) > 2:
            attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return identity_forward(inputs, dtype)

    guard = GuardedForward(None, CPU, torch.float32, forward, "VAE")
    x = torch.arange(8.0)[:, None]
    results = guard((x,))
    assert [r if isinstance(r, str) else float(r) for r in results] == [float(i) for i in range(8)]
    assert guard.oom_splits == 3  # 8 -> 4 + 4 -> 2 + 2, 2 + 2


def test_mps_out_of_memory_is_split_like_cuda_s():
    def forward(inputs, dtype):
        if len(inputs[0]) > 1:  # what MPS raises: a plain RuntimeError
            raise RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)")
        return identity_forward(inputs, dtype)

    guard = GuardedForward(None, CPU, torch.float32, forward, "VAE")
    results = guard((torch.arange(3.0)[:, None],))
    assert [float(r) for r in results] == [0.0, 1.0, 2.0] and guard.oom_splits == 2


@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA out of memory")]
)
def test_out_of_memory_is_recognised_under_every_name(error):
    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Half"))


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    def forward(inputs, dtype):
        raise RuntimeError("expected scalar type Float but found Half")

    with pytest.raises(RuntimeError, match="scalar type"):
        GuardedForward(None, CPU, torch.float32, forward, "VAE")((torch.zeros(2, 1),))


@pytest.mark.parametrize("keep", [True, False], ids=["kept-fp32-copy", "converted-in-place"])
def test_fp32_redo_without_room_for_fp32_weights_fails_those_items_and_restores_the_module(monkeypatch, keep):
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).half()
    module[2].float()  # a module kept in fp32, as transformers keeps T5's wo
    before = {n: t.dtype for n, t in module.state_dict().items()}
    monkeypatch.setattr(encode, "KEEP_FP32_MAX_BYTES", 1 << 30 if keep else 0)
    converted = []

    def to_dtype(t, dtype):  # the second fp32 conversion runs out of memory, as on a small card
        if dtype == torch.float32 and converted:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        converted.append(dtype == torch.float32)
        return t.to(dtype)

    monkeypatch.setattr(encode, "_to_dtype", to_dtype)

    def forward(inputs, dtype):  # item 1 overflows in fp16
        return [torch.full((2,), float("nan") if v == 1 else float(v)) for v in inputs[0][:, 0].tolist()]

    guard = GuardedForward(module, CPU, torch.float16, forward, "VAE")
    results = guard((torch.arange(3.0)[:, None],))
    assert isinstance(results[1], str)
    assert "non-finite" in results[1] and "not enough device memory to redo it in fp32" in results[1]
    assert not isinstance(results[0], str) and not isinstance(results[2], str)
    assert {n: t.dtype for n, t in module.state_dict().items()} == before  # never a half-converted module


# -- device and dtype choice ----------------------------------------------------------------------------


def test_resolve_dtype():
    assert resolve_dtype(DType.AUTO, CPU) is DType.FP32
    assert resolve_dtype(DType.BF16, CPU) is DType.BF16
    assert resolve_dtype(DType.FP16, CPU) is DType.FP16


def test_pick_device_honours_the_request():
    assert pick_device("cpu") == CPU
    assert pick_device(None).type in ("cuda", "mps", "cpu")

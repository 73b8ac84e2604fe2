"""models: resolving local VAE sources, reading the family from configs, loading, offline errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cachebuild.cache.files import sha256_file
from cachebuild.config import ModelSpec
from cachebuild.errors import ModelLoadError
from cachebuild.families.vae import family_of, load_vae
from cachebuild.hub import ResolvedVae, resolve_vae
from cachebuild.testing import make_tiny_taesd, make_tiny_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def single_file(tiny_vae, tmp_path_factory) -> Path:
    """The tiny VAE's weights as one .safetensors file with diffusers-format keys."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    path = tmp_path_factory.mktemp("single") / "my-vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the env var for any fresh import, and the already-imported constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_resolve_local_diffusers_folder(tiny_vae):
    vae = resolve_vae(ModelSpec(vae=str(tiny_vae)))
    assert vae.folder == tiny_vae and vae.file is None
    assert vae.source == str(tiny_vae)
    assert vae.config["_class_name"] == "AutoencoderKL"
    assert [p.name for p in vae.weight_files] == ["diffusion_pytorch_model.safetensors"]


def test_resolve_pipeline_folder_uses_its_vae(tiny_vae, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_vae, pipe / "vae")
    (pipe / "unet").mkdir()
    (pipe / "model_index.json").write_text("{}")
    vae = resolve_vae(ModelSpec(model=str(pipe)))
    assert vae.folder == pipe / "vae" and vae.file is None
    assert vae.source == str(pipe)
    assert vae.weight_files == (pipe / "vae" / "diffusion_pytorch_model.safetensors",)


def test_resolve_pipeline_folder_given_as_vae(tiny_vae, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_vae, pipe / "vae")
    assert resolve_vae(ModelSpec(vae=str(pipe))).folder == pipe / "vae"


def test_resolve_pipeline_folder_without_vae(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="--vae"):
        resolve_vae(ModelSpec(model=str(pipe)))


def test_resolve_folder_without_config_or_weights(tiny_vae, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_vae(ModelSpec(vae=str(tmp_path / "empty")))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_vae / "config.json", no_weights / "config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_vae(ModelSpec(vae=str(no_weights)))


def test_resolve_single_file_with_vae_config(single_file, tiny_vae):
    vae = resolve_vae(ModelSpec(vae=str(single_file), vae_config=str(tiny_vae)))
    assert vae.file == single_file and vae.folder == tiny_vae
    assert vae.weight_files == (single_file,)
    assert vae.config["block_out_channels"] == [8, 16]


def test_resolve_single_file_config_from_a_pipeline_folder(single_file, tiny_vae, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_vae, pipe / "vae")
    vae = resolve_vae(ModelSpec(vae=str(single_file), vae_config=str(pipe)))
    assert vae.folder == pipe / "vae" and vae.file == single_file
    vae = resolve_vae(ModelSpec(model=str(pipe), vae=str(single_file)))  # --model supplies the config
    assert vae.folder == pipe / "vae" and vae.file == single_file


def test_single_file_without_any_config_says_what_to_add(single_file):
    with pytest.raises(ModelLoadError, match="--vae-config"):
        resolve_vae(ModelSpec(vae=str(single_file)))


def test_family_from_the_tiny_vae_config(tiny_vae):
    family = family_of(resolve_vae(ModelSpec(vae=str(tiny_vae))), preset=None)
    assert family.cls == "AutoencoderKL" and family.has_posterior
    assert family.latent_channels == 4
    assert family.downsample == 2  # two blocks
    assert family.scaling_factor == pytest.approx(0.13025)
    assert family.shift_factor is None


def test_family_reads_channels_scaling_and_shift(tmp_path):
    folder = make_tiny_vae(tmp_path / "flux-like", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    family = family_of(resolve_vae(ModelSpec(vae=str(folder))), preset="sdxl")  # the config wins over the preset
    assert family.latent_channels == 16
    assert family.scaling_factor == pytest.approx(0.3611)
    assert family.shift_factor == pytest.approx(0.1159)
    assert family.downsample == 2


def _without(config: dict, *keys: str) -> ResolvedVae:
    cfg = {k: v for k, v in config.items() if k not in keys}
    return ResolvedVae("old-single-file", None, Path("x.safetensors"), cfg, ())


def test_family_falls_back_to_preset_factors(tiny_vae):
    config = resolve_vae(ModelSpec(vae=str(tiny_vae))).config
    sd3 = family_of(_without(config, "scaling_factor", "shift_factor", "latent_channels"), preset="sd3")
    assert (sd3.scaling_factor, sd3.shift_factor, sd3.latent_channels) == (1.5305, 0.0609, 16)
    sd15 = family_of(_without(config, "scaling_factor"), preset="sd15")
    assert sd15.scaling_factor == 0.18215 and sd15.latent_channels == 4  # channels still from the config
    default_blocks = family_of(_without(config, "scaling_factor", "block_out_channels"), preset="sdxl")
    assert default_blocks.downsample == 8 and default_blocks.scaling_factor == 0.13025


def test_family_without_scaling_and_without_preset_says_what_to_pass(tiny_vae):
    config = resolve_vae(ModelSpec(vae=str(tiny_vae))).config
    with pytest.raises(ModelLoadError, match="--model sd15"):
        family_of(_without(config, "scaling_factor"), preset=None)


def test_family_of_autoencoder_tiny(tmp_path):
    folder = make_tiny_taesd(tmp_path / "taesd")
    family = family_of(resolve_vae(ModelSpec(vae=str(folder))), preset=None)
    assert family.cls == "AutoencoderTiny"
    assert family.downsample == 8
    assert family.has_posterior is False
    assert family.latent_channels == 4


def test_load_vae_folder_and_single_file_encode_the_same(tiny_vae, single_file):
    folder = resolve_vae(ModelSpec(vae=str(tiny_vae)))
    single = resolve_vae(ModelSpec(vae=str(single_file), vae_config=str(tiny_vae)))
    a = load_vae(folder, family_of(folder, None), torch.float32, CPU)
    b = load_vae(single, family_of(single, None), torch.float32, CPU)
    assert not a.training and not b.training
    assert not any(p.requires_grad for p in a.parameters())
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pa = a.encode(x).latent_dist.parameters
        pb = b.encode(x).latent_dist.parameters
    assert pa.shape == (2, 8, 8, 12)
    assert torch.equal(pa, pb)


def test_load_vae_in_a_lower_dtype(tiny_vae):
    vae = resolve_vae(ModelSpec(vae=str(tiny_vae)))
    model = load_vae(vae, family_of(vae, None), torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_taesd(tmp_path):
    folder = make_tiny_taesd(tmp_path / "taesd")
    vae = resolve_vae(ModelSpec(vae=str(folder)))
    model = load_vae(vae, family_of(vae, None), torch.float32, CPU)
    with torch.no_grad():
        latents = model.encode(torch.zeros(1, 3, 32, 32)).latents
    assert latents.shape == (1, 4, 4, 4)


def test_single_file_with_wrong_architecture_is_a_model_load_error(single_file, tmp_path):
    other = make_tiny_vae(tmp_path / "other", latent_channels=16)
    vae = resolve_vae(ModelSpec(vae=str(single_file), vae_config=str(other)))
    with pytest.raises(ModelLoadError, match=str(single_file)):
        load_vae(vae, family_of(vae, None), torch.float32, CPU)


@pytest.mark.parametrize("field", ["vae", "model"])
def test_missing_local_path_says_what_to_do(tmp_path, offline, field):
    missing = str(tmp_path / "no" / "such-vae")
    with pytest.raises(ModelLoadError) as info:
        resolve_vae(ModelSpec(**{field: missing}))
    message = str(info.value)
    assert missing in message
    assert "local" in message and "spelling" in message


def test_unknown_hub_id_offline_says_what_to_do(offline):
    with pytest.raises(ModelLoadError) as info:
        resolve_vae(ModelSpec(vae="nobody-here/no-such-vae-xyz"))
    assert "nobody-here/no-such-vae-xyz" in str(info.value)
    assert "huggingface-cli login" in str(info.value) or "local" in str(info.value)


def test_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "w.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def _hub_major() -> int:
    import huggingface_hub

    return int(huggingface_hub.__version__.split(".")[0])


@pytest.mark.skipif(_hub_major() < 1, reason="huggingface_hub < 1.0 still ships huggingface-cli")
def test_hub_error_names_a_login_command_that_exists(offline):
    with pytest.raises(ModelLoadError) as info:
        resolve_vae(ModelSpec(vae="nobody-here/no-such-vae-xyz"))
    assert "hf auth login" in str(info.value)

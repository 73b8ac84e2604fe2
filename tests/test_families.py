"""The family registry: every text family has one module that declares it, and detection and the stored dtype
come from those modules."""

from __future__ import annotations

import json

import pytest

from cachebuild.config import DType, TextFamily
from cachebuild.errors import ConfigError
from cachebuild.families import MODULES, family_module
from cachebuild.families.text import _detect_family, stored_dtype

FAMILIES = [f for f in TextFamily if f is not TextFamily.GENERIC]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_every_family_has_a_module_that_declares_it(family):
    module = family_module(family)
    assert MODULES[family] == module.__name__.rsplit(".", 1)[1]
    assert callable(module.encoder_specs) and callable(module.pipeline_inputs)
    assert set(module.PIPELINES.values()) <= {f.value for f in TextFamily}
    assert isinstance(getattr(module, "STORED_DTYPE", DType.FP16), DType)


def test_each_pipeline_class_names_a_family_its_own_module_declares():
    by_class = {}
    for name in sorted(set(MODULES.values())):
        module = family_module(next(f for f, m in MODULES.items() if m == name))
        for cls, family in module.PIPELINES.items():
            assert cls not in by_class, f"{cls} is declared twice"
            assert MODULES[family] == name, f"{name}.PIPELINES names {family}, which MODULES puts elsewhere"
            by_class[cls] = family
    # sd2 has no pipeline class of its own: StableDiffusionPipeline with a 1024-wide text encoder
    assert set(by_class.values()) == {f.value for f in FAMILIES} - {"sd2"}


@pytest.mark.parametrize(("width", "family"), [(768, TextFamily.SD15), (1024, TextFamily.SD2)])
def test_stable_diffusion_pipeline_is_told_apart_by_its_text_encoder_width(tmp_path, width, family):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": width}))
    assert _detect_family(str(tmp_path), tmp_path) is family


def test_an_unknown_pipeline_class_asks_for_family(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline"}))
    with pytest.raises(ConfigError, match="SomeOtherPipeline.*pass --family"):
        _detect_family(str(tmp_path), tmp_path)


def test_stored_dtype_is_fp16_unless_the_module_says_otherwise():
    assert stored_dtype(TextFamily.SD15) is stored_dtype(TextFamily.FLUX) is stored_dtype(TextFamily.GENERIC)
    assert stored_dtype(TextFamily.GENERIC) is DType.FP16
    assert {f for f in FAMILIES if stored_dtype(f) is DType.BF16} == {
        TextFamily.ZIMAGE,
        TextFamily.QWENIMAGE,
        TextFamily.HIDREAM,
        TextFamily.FLUX2,
        TextFamily.FLUX2_KLEIN,
        TextFamily.LUMINA2,
        TextFamily.SANA,
        TextFamily.QWENIMAGE_EDIT,
        TextFamily.QWENIMAGE_EDIT_PLUS,
        TextFamily.HUNYUANVIDEO15,  # Qwen2.5-VL (its ByT5 too: one dtype per cache)
        TextFamily.LTX2,  # Gemma 3
    }

"""params.yaml validation: wrong keys/types/values fail at load with exit code 2 and the key's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import ParamsError
from lensmith.params import Params, apply_overrides, load_params
from lensmith.paramsfile import params_overridden

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid_and_complete() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.split.train == pytest.approx(0.70)
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(on_disk) == set(Params.model_fields), "params.yaml should list every section"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_params(tmp_path / "absent.yaml") == Params()


@pytest.mark.parametrize(
    ("override", "expected_fragment"),
    [
        ("train.bogus=1", "train.bogus: unknown key; allowed keys here: amp, augment"),
        ("bogus.x=1", "bogus: unknown key; allowed keys here: data, demo"),
        ("train.lr=abc", "train.lr: Input should be a valid number"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.model=alexnet", "'efficientnet_lite0', 'mobilenet_v3_small'"),
        ("split.train=0.9", "train + val + test must sum to 1.0"),
        ("validate.brightness_range=[200, 100]", "brightness_range must be [low, high]"),
        ("data.image_extensions=[]", "data.image_extensions"),
        ("train.image_size=24", "train.image_size=24 is too small for efficientnet_lite0"),
        ("train.model=vit_b_16", "cannot be used with vit_b_16"),
        ("evaluate.slices=site", "evaluate.slices"),
        ("validate.required_metadata=all", "validate.required_metadata"),
        ("evaluate.providers=gpu", "evaluate.providers: expected 'auto' or a non-empty list of TensorrtExecutionProvider"),
        ("drift.providers=[CUDA]", "drift.providers: expected 'auto' or a non-empty list"),
        ("export.parity_providers=[]", "export.parity_providers: expected 'auto' or a non-empty list"),
        ("export.parity_providers=1", "export.parity_providers: expected 'auto'"),
        ("serve.providers=auto", "serve.providers"),  # serving names its providers
    ],
)
def test_bad_values_name_the_key(override: str, expected_fragment: str) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(ROOT / "params.yaml", [override])
    assert expected_fragment in str(info.value)


def test_cli_exits_2_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: many\n")
    result = CliRunner().invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    assert "train.epochs" in result.output
    assert "Traceback" not in result.output


def test_cli_rejects_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    result = CliRunner().invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    assert "must hold a mapping" in result.output


def test_set_overrides_apply_nested_and_parse_yaml() -> None:
    merged = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.01", "train.augment.hflip=false", "evaluate.slices=[site]"])
    assert merged == {"train": {"lr": 0.01, "augment": {"hflip": False}}, "evaluate": {"slices": ["site"]}}
    params = Params.model_validate(merged)
    assert params.train.augment.hflip is False


def test_set_without_equals_is_rejected() -> None:
    with pytest.raises(ParamsError, match="key=value"):
        load_params(ROOT / "params.yaml", ["train.lr"])


def test_params_overridden_restores_file_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    original = b"# comment kept\ntrain:\n  epochs: 8\n"
    path.write_bytes(original)
    with params_overridden(path, ["train.epochs=2"]):
        assert yaml.safe_load(path.read_text())["train"]["epochs"] == 2
    assert path.read_bytes() == original


def test_params_overridden_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 8\n")
    with pytest.raises(ParamsError):
        with params_overridden(path, ["train.epochs=-3"]):
            pass
    assert path.read_text() == "train:\n  epochs: 8\n"


def test_measuring_stages_providers_are_auto_or_a_list_of_provider_names() -> None:
    defaults = load_params(ROOT / "params.yaml")
    assert defaults.evaluate.providers == defaults.drift.providers == defaults.export.parity_providers == "auto"
    chosen = load_params(
        ROOT / "params.yaml",
        ["evaluate.providers=[CUDAExecutionProvider, CPUExecutionProvider]", "drift.providers=[CPUExecutionProvider]",
         "export.parity_providers=[TensorrtExecutionProvider]"],
    )
    assert chosen.evaluate.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chosen.drift.providers == ["CPUExecutionProvider"]
    assert chosen.export.parity_providers == ["TensorrtExecutionProvider"]

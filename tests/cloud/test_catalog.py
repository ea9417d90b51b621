"""cloud/catalog: the built-in classes, user class files, and bad files refused with file and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cloud.catalog import BUILTIN_DIR, builtin_catalog, load_catalog
from edgefleet.cloud.errors import Invalid

BUILTINS = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-cpu"}


def test_builtin_classes_parse_with_power_and_budgets():
    catalog = builtin_catalog()
    assert set(catalog) == BUILTINS
    for name, info in catalog.items():
        assert info.name == name
        assert info.cores >= 1 and info.memory_mb >= 1024
        assert "onnxruntime" in info.runtimes and info.execution_providers[-1] == "CPUExecutionProvider"
        assert 0 < info.idle_watts < info.active_watts
        b = info.budgets
        assert b.p95_latency_ms and b.mj_per_inference and b.model_mb
    assert catalog["jetson-orin-nano"].accelerator and "TensorrtExecutionProvider" in (
        catalog["jetson-orin-nano"].execution_providers)
    assert catalog["rpi4"].accelerator is None


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_power_figure_has_its_source_in_a_comment(name):
    lines = (BUILTIN_DIR / f"{name}.toml").read_text().splitlines()
    idle = next(i for i, line in enumerate(lines) if line.startswith("idle_watts"))
    comment = " ".join(line for line in lines[max(0, idle - 6):idle] if line.startswith("#")).lower()
    assert comment, f"{name}.toml: no comment above the power figures"
    assert any(word in comment for word in ("geerling", "data sheet", "datasheet", "assumed", "nvidia")), comment


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


GOOD = """
cores = 2
memory_mb = 1024
runtimes = ["onnxruntime"]
idle_watts = 0.5
active_watts = 2.0
[budgets]
p95_latency_ms = 200.0
"""


def test_user_files_add_and_override_classes(tmp_path: Path):
    write(tmp_path, "my-board", GOOD)
    write(tmp_path, "rpi4", GOOD.replace("cores = 2", "cores = 3"))
    catalog = load_catalog(tmp_path)
    assert catalog["my-board"].budgets.p95_latency_ms == 200.0
    assert catalog["my-board"].execution_providers == ["CPUExecutionProvider"]  # the default
    assert catalog["rpi4"].cores == 3
    assert BUILTINS <= set(catalog)


def test_missing_extra_dir_is_just_the_builtins(tmp_path: Path):
    assert set(load_catalog(tmp_path / "absent")) == BUILTINS


def test_unknown_key_names_file_and_key(tmp_path: Path):
    path = write(tmp_path, "board", GOOD + "\n")
    path.write_text(GOOD.replace("cores = 2", "cores = 2\ngpu_cores = 128"))
    with pytest.raises(Invalid, match=r"board\.toml: key 'gpu_cores': unknown key"):
        load_catalog(tmp_path)


def test_wrong_value_names_the_key(tmp_path: Path):
    write(tmp_path, "board", GOOD.replace("active_watts = 2.0", "active_watts = -1"))
    with pytest.raises(Invalid, match=r"board\.toml: key 'active_watts'"):
        load_catalog(tmp_path)
    write(tmp_path, "board", GOOD.replace("p95_latency_ms = 200.0", "p95_latency_ms = 'fast'"))
    with pytest.raises(Invalid, match=r"key 'budgets\.p95_latency_ms'"):
        load_catalog(tmp_path)


def test_missing_required_key(tmp_path: Path):
    write(tmp_path, "board", GOOD.replace("cores = 2\n", ""))
    with pytest.raises(Invalid, match="key 'cores'"):
        load_catalog(tmp_path)


def test_name_must_match_the_file(tmp_path: Path):
    write(tmp_path, "board", 'name = "other"\n' + GOOD)
    with pytest.raises(Invalid, match="file is named 'board'"):
        load_catalog(tmp_path)


def test_invalid_class_name_from_file(tmp_path: Path):
    write(tmp_path, "Bad_Name", GOOD)
    with pytest.raises(Invalid, match="key 'name'"):
        load_catalog(tmp_path)


def test_bad_toml(tmp_path: Path):
    write(tmp_path, "board", "cores = [\n")
    with pytest.raises(Invalid, match=r"board\.toml: not valid TOML"):
        load_catalog(tmp_path)

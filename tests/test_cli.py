"""The one command-line grammar: `--set`, `--root`, `--out` everywhere (old spellings as hidden aliases that set the
same value), every option described in `--help` with its default, `aqrcmt --version`, `aqrcmt configs`,
`aqrcmt train` (the same options as train/main.py) and `aqrcmt inspect` on a checkpoint directory."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint.io import save_safetensors_atomic
from aqrcmt.cli import COMMANDS, build_parser, main
from aqrcmt.presets import get_preset, list_presets

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv[0]).parse_args(argv)


def _script_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser train/<script>.py builds (captured at parse time)."""
    spec = importlib.util.spec_from_file_location(f"train_{script}", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = {}

    def stop(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(SystemExit):
            module.main([])
    return captured["parser"]


ALIASES = [   # (argv with the old spelling, argv with the one name), for each command that had one
    (["evaluate", "--checkpoint", "c", "--override", "a=1", "b=2"], ["evaluate", "--checkpoint", "c", "--set", "a=1", "b=2"]),
    (["evaluate", "--checkpoint", "c", "--eval-set", "val"], ["evaluate", "--checkpoint", "c", "--split", "val"]),
    (["predict", "--checkpoint", "c", "--out", "o", "--override", "a=1"],
     ["predict", "--checkpoint", "c", "--out", "o", "--set", "a=1"]),
    (["diagnose", "--config", "tiny_aqr", "--data", "d"], ["diagnose", "--config", "tiny_aqr", "--root", "d"]),
    (["create-infos", "--root", "r", "--out-dir", "o"], ["create-infos", "--root", "r", "--out", "o"]),
    (["train", "--config", "tiny", "--output-dir", "o"], ["train", "--config", "tiny", "--out", "o"]),
    (["train", "--config", "tiny", "--data", "d"], ["train", "--config", "tiny", "--root", "d"]),
    (["train", "--config", "tiny", "--allow-missing", "a", "--allow-missing", "b"],
     ["train", "--config", "tiny", "--allow-missing", "a", "b"]),
    (["convert", "s", "d", "--config", "tiny", "--allow-unexpected", "a", "--allow-unexpected", "b"],
     ["convert", "s", "d", "--config", "tiny", "--allow-unexpected", "a", "b"]),
]


@pytest.mark.parametrize("old, new", ALIASES, ids=[" ".join(old[:1] + old[3:5]) for old, _ in ALIASES])
def test_an_old_spelling_sets_what_the_one_name_sets(old: list[str], new: list[str]) -> None:
    assert _parse(old) == _parse(new)


def test_the_old_spellings_are_left_out_of_help_and_the_one_names_are_in(capsys) -> None:
    for command, old, new in [("evaluate", "--override", "--set"), ("evaluate", "--eval-set", "--split"),
                              ("diagnose", "--data", "--root"), ("create-infos", "--out-dir", "--out"),
                              ("train", "--output-dir", "--out"), ("build-gt-database", "--override", "--set")]:
        text = _help(command)
        assert new in text and old not in text, (command, text)


# What each command reads (a config: its --config, or configs' NAME; a dataset: a nuScenes root), and the least it
# parses with. Every command is listed, so a new one has to be placed here (and so gets checked).
READS: dict[str, tuple[set[str], list[str]]] = {
    "configs": ({"config"}, []),
    "train": ({"config", "dataset"}, ["--config", "tiny"]),
    "evaluate": ({"config", "dataset"}, ["--checkpoint", "c"]),
    "predict": ({"config", "dataset"}, ["--checkpoint", "c", "--out", "o"]),
    "make-synthetic-nuscenes": (set(), ["--out", "o"]),                  # writes a dataset
    "create-infos": ({"dataset"}, []),
    "build-gt-database": ({"config", "dataset"}, []),
    "convert": ({"config", "dataset"}, ["s", "d", "--config", "tiny"]),  # the root is stored with the config
    "inspect": (set(), ["c"]),
    "diagnose": ({"config", "dataset"}, ["--config", "tiny_aqr"]),
    "export": ({"config", "dataset"}, ["--checkpoint", "c", "--out", "o"]),
    "study": ({"config"}, ["--out", "o"]),                          # its arms' presets; builds its own benchmarks
    "check-data": ({"dataset"}, ["--split", "val"]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_taking_a_config_accepts_set_and_every_one_reading_a_dataset_accepts_root(command: str) -> None:
    """Walks every `aqrcmt` command: --set (old spelling --override) where it takes a config, --root (old spelling
    --data unless required) where it reads a nuScenes root, both as aqrcmt/tools/options.py spells them."""
    assert set(READS) == set(COMMANDS)
    reads, argv = READS[command]
    sub = _command_parser(command)
    actions = {flag: a for a in sub._actions for flag in a.option_strings}
    assert "--config" not in actions or "config" in reads, f"{command} takes --config: list it as such"
    root = ["--root", "/data/nuscenes"] if "--root" in actions else []
    if "config" in reads:
        args = sub.parse_args(argv + root + ["--set", "a=1", "b=2", "--override", "c=3"])
        assert args.set == ["a=1", "b=2", "c=3"]
    else:
        assert "--set" not in actions
    if "dataset" in reads:
        assert sub.parse_args(argv + root).root == "/data/nuscenes"
        assert actions["--root"].required or sub.parse_args(argv + ["--data", "r"]).root == "r"
    else:
        assert "--root" not in actions


def test_convert_stores_the_config_with_set_and_root_applied(tmp_path: Path, capsys) -> None:
    """`aqrcmt convert --set k=v --root R` writes the config with k=v and data.root=R into the safetensors, where
    evaluate and predict read it."""
    from test_convert import LIDAR, synthetic_state_dict, write_mmcv_checkpoint

    from aqrcmt.checkpoint.manifest import load_manifest
    from aqrcmt.checkpoint.weights import stored_config

    src = write_mmcv_checkpoint(tmp_path / "lidar.pth", synthetic_state_dict(load_manifest(LIDAR)))
    dst = tmp_path / "lidar.safetensors"
    assert main(["convert", str(src), str(dst), "--config", LIDAR, "--root", "/data/nuscenes",
                 "--set", "data.val_split=mini_val", "model.head.score_threshold=0.2"]) == 0
    cfg = stored_config(dst)
    assert (cfg.data.root, cfg.data.val_split, cfg.model.head.score_threshold) == ("/data/nuscenes", "mini_val", 0.2)


def _command_parser(command: str) -> argparse.ArgumentParser:
    """The sub-parser of `command` as `aqrcmt` builds it."""
    parser = build_parser(command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _help(command: str) -> str:
    """`aqrcmt COMMAND --help`, its lines joined (argparse wraps at the terminal width)."""
    return " ".join(_command_parser(command).format_help().split())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_a_description_and_help_has_no_sphinx_markup(command: str) -> None:
    sub = _command_parser(command)
    undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not undocumented, f"{command}: options without help: {undocumented}"
    text = sub.format_help()
    for markup in ("``", ":func:", ":mod:", ":class:"):
        assert markup not in text, f"{command} --help shows {markup!r}"
    assert sub.description


def test_the_top_level_help_lists_every_command_without_markup() -> None:
    text = " ".join(build_parser(None).format_help().split())
    assert all(name in text for name in COMMANDS) and ":mod:" not in text and "``" not in text


def test_help_states_the_defaults() -> None:
    assert "corruption severities (default: 1 2 3)" in _help("evaluate")
    assert "(default: 0.3)" in _help("predict")                    # --score-threshold
    assert "(default: aqr_diagnose)" in _help("diagnose")          # --out
    assert "(default: the checkpoint's stored config)" in _help("evaluate")   # stated in words, not repeated
    assert "(default: None)" not in _help("evaluate")


def test_aqrcmt_train_has_the_options_of_train_main() -> None:
    options = {s for a in _script_parser("main")._actions for s in a.option_strings}
    assert options == {s for a in _command_parser("train")._actions for s in a.option_strings}
    assert {"--set", "--root", "--out", "--resume", "--load-from", "--allow-missing"} <= options


def test_train_turns_root_out_and_set_into_config_overrides(tmp_path: Path, monkeypatch) -> None:
    """`aqrcmt train --root R --out O --set k=v` trains the config with data.root=R, train.output_dir=O, k=v."""
    import aqrcmt.training.loop as loop

    seen = {}

    def fake_train(cfg, options):
        seen["cfg"], seen["options"] = cfg, options
        raise SystemExit(0)

    monkeypatch.setattr(loop, "train", fake_train)
    with pytest.raises(SystemExit):
        main(["train", "--config", "tiny", "--root", str(tmp_path), "--out", str(tmp_path / "run"), "--set",
              "optim.lr=0.5", "--allow-missing", "a.*", "--resume"])
    cfg = seen["cfg"]
    assert (cfg.data.root, cfg.train.output_dir, cfg.optim.lr) == (str(tmp_path), str(tmp_path / "run"), 0.5)
    assert seen["options"].allow_missing == ["a.*"] and seen["options"].resume == "latest"


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("aqrcmt 0.1.0 (torch ")


def test_configs_lists_every_preset_on_one_line(capsys) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in list_presets():
        line = next(line for line in lines if line.split()[:1] == [name])
        assert "epochs" in line and "lr" in line
    recommended = next(line for line in lines if line.startswith("tiny_aqr_recommended "))
    assert "AQR (normalized kernel sigma 2, convex residual 0.5)" in recommended
    camera_only = next(line for line in lines if line.startswith("cmt_camera_vov_1600x640_cbgs "))
    assert "camera vovnet99 640x1600" in camera_only and "LiDAR" not in camera_only


def test_configs_prints_one_config_with_set_applied(capsys) -> None:
    assert main(["configs", "tiny", "--set", "optim.lr=0.5", "data.root=/data/nuscenes"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["data"]["root"] == "/data/nuscenes"
    assert printed["model"] == json.loads(get_preset("tiny").to_json())["model"]


def test_inspect_a_checkpoint_directory_shows_config_step_and_metrics(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "step_00000120"
    ckpt.mkdir()
    config = get_preset("tiny_aqr_recommended").to_json()
    save_safetensors_atomic({"pts_bbox_head.w": torch.zeros(2, 3)}, ckpt / "model.safetensors",
                            {"config": config, "step": "120", "epoch": "4", "format": "aqrcmt"})
    (ckpt / "metrics.json").write_text(json.dumps({"mAP": 0.2411, "NDS": 0.25, "mATE": 0.5, "AP/car": 0.3}))
    assert main(["inspect", str(ckpt), "--summary"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [f"{ckpt / 'model.safetensors'} (safetensors)",
                                    "config: tiny_aqr_recommended (stored in full: evaluate / predict need no --config)",
                                    "step 120, epoch 4"]
    assert "metrics.json: mAP 0.2411  NDS 0.2500  mATE 0.5000" in out
    assert "format: aqrcmt" in out and '"model"' not in out          # the config JSON is not dumped
    assert "pts_bbox_head: 1 keys, 6 elements" in out

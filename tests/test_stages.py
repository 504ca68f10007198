import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from trustser.stages import STAGE_RECORD, StageRunner, stage_key
from trustser.systems import SYSTEMS, get_system


class SingleProcess(SimpleNamespace):
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_stage_runs_once_and_is_reused(tmp_path):
    runner = StageRunner(tmp_path, SingleProcess())
    calls = []

    def fn(out):
        calls.append(out)
        (out / "value.txt").write_text("42")

    a = runner.run("corpus", {"seed": 0}, fn)
    b = runner.run("corpus", {"seed": 0}, fn)
    assert len(calls) == 1 and not a.reused and b.reused
    assert a.path == b.path and (a.path / "value.txt").read_text() == "42"
    assert a.record()["settings"] == {"seed": 0}
    c = runner.run("corpus", {"seed": 1}, fn)  # other settings: another folder
    assert c.path != a.path and len(calls) == 2


def test_key_depends_on_upstream(tmp_path):
    runner = StageRunner(tmp_path, SingleProcess())
    up0 = runner.run("corpus", {"seed": 0}, lambda out: None)
    up1 = runner.run("corpus", {"seed": 1}, lambda out: None)
    assert stage_key("annotate", {"m": "u"}, [up0]) != stage_key("annotate", {"m": "u"}, [up1])
    assert stage_key("annotate", {"m": "u"}, [up0]) == stage_key("annotate", {"m": "u"}, [up0])


def test_path_setting_ignores_how_the_output_dir_is_spelled(tmp_path, monkeypatch):
    """A table run with a relative ``--output_dir`` and one with the absolute path share stages."""
    monkeypatch.chdir(tmp_path)
    relative = StageRunner("out/cache", SingleProcess())
    absolute = StageRunner(tmp_path / "out" / "cache", SingleProcess())
    corpus = relative.run("corpus", {"seed": 0}, lambda out: (out / "corpus").mkdir())
    inside_rel = "out/cache/" + corpus.path.name + "/corpus"
    inside_abs = tmp_path / "out" / "cache" / corpus.path.name / "corpus"
    assert relative.path_setting(inside_rel) == absolute.path_setting(inside_abs)
    assert relative.path_setting(inside_rel) == f"cache:{corpus.path.name}/corpus"
    (tmp_path / "data").mkdir()
    assert relative.path_setting("data") == absolute.path_setting(tmp_path / "data") == str(tmp_path / "data")
    assert relative.path_setting(None) is None


@pytest.mark.faults
def test_failed_stage_is_not_taken_for_finished(tmp_path):
    runner = StageRunner(tmp_path, SingleProcess())

    def boom(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        runner.run("pretrain", {"x": 1}, boom)
    assert not any(p.name.startswith("pretrain-") for p in tmp_path.iterdir())
    s = runner.run("pretrain", {"x": 1}, lambda out: (out / "ok.txt").write_text("ok"))
    assert not s.reused and (s.path / "ok.txt").exists() and not (s.path / "half.txt").exists()


@pytest.mark.faults
def test_killed_stage_is_rerun(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from types import SimpleNamespace
        from trustser.stages import StageRunner
        class P(SimpleNamespace):
            is_main_process = True
            def wait_for_everyone(self): pass
        def fn(out):
            (out / "partial.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        StageRunner({str(tmp_path)!r}, P()).run("posttrain", {{"k": 6}}, fn)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert not any(p.name.startswith("posttrain-") for p in tmp_path.iterdir())  # only a hidden .partial
    runner = StageRunner(tmp_path, SingleProcess())
    s = runner.run("posttrain", {"k": 6}, lambda out: (out / "done.txt").write_text("1"))
    assert not s.reused and sorted(p.name for p in s.path.iterdir()) == [STAGE_RECORD, "done.txt"]


def test_systems_table_matches_paper():
    assert [s for s in SYSTEMS if s.startswith("sys")] == [f"sys{i}" for i in range(1, 14)]
    s10 = get_system(10)
    assert (s10.with_sed, s10.domain_sft, s10.selection_ratio, s10.rectify, s10.num_policies) == (
        True,
        True,
        0.9,
        True,
        6,
    )
    assert s10.paper_iemocap == 80.98 and s10.paper_meld == 64.11
    assert get_system("sys1").with_sed is False and get_system(1).domain_sft is False
    assert get_system(4).selection_ratio is None and not get_system(4).rectify
    assert [get_system(f"sys{i}").selection_ratio for i in (5, 6, 7, 8)] == [0.9, 0.8, 0.7, 0.6]
    assert [get_system(f"v{i}").num_policies for i in range(1, 6)] == [2, 4, 6, 8, 10]
    with pytest.raises(KeyError, match="unknown system"):
        get_system(14)


@pytest.mark.faults
def test_wrong_model_directory_is_a_clear_error(tmp_path):
    """Issue 9: a model directory of the wrong type names the directory and the problem."""
    import torch

    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.models.ser_slm import SerSlmForConditionalGeneration

    torch.manual_seed(0)
    cem_dir = tmp_path / "cem"
    CemModel(CemConfig(input_size=8)).save_pretrained(cem_dir)
    with pytest.raises(ValueError, match=r"cem.*holds a 'cem' checkpoint, not a SerSlmForConditionalGeneration"):
        SerSlmForConditionalGeneration.from_pretrained(cem_dir)
    with pytest.raises(ValueError, match="not a SedControllerModel"):
        SedControllerModel.from_pretrained(cem_dir)
    ctrl_dir = tmp_path / "controller"
    SedControllerModel(SedControllerConfig()).save_pretrained(ctrl_dir)
    with pytest.raises(ValueError, match="not a CemModel"):
        CemModel.from_pretrained(ctrl_dir)
    assert isinstance(CemModel.from_pretrained(cem_dir), CemModel)


def test_honour_umask_tree_sets_modes_and_skips_entries_that_vanish(tmp_path, monkeypatch):
    """Outputs get the umask's mode; a temporary file another run renames away while the tree is
    walked is skipped, not an error (two runs of one system on one output folder)."""
    import os

    from trustser.utils import current_umask, honour_umask_tree

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"x")
    os.chmod(tmp_path / "sub" / "weights.bin", 0o600)
    real_walk = os.walk

    def walk_with_a_vanished_file(top, *a, **k):
        for dirpath, dirs, files in real_walk(top, *a, **k):
            yield dirpath, dirs, files + [".results.json.gone.tmp"]

    monkeypatch.setattr(os, "walk", walk_with_a_vanished_file)
    honour_umask_tree(tmp_path)
    assert (tmp_path / "sub" / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~current_umask()

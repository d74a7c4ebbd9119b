"""A stage's identity covers exactly the code it runs (its import closure, `pipelines.code_identity`): an edit
deep in one stage's code reruns that stage and what depends on it, and nothing else; an edit to a comment, a
docstring or a file no stage runs reruns nothing. Each case edits a temporary copy of the tree."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.code_identity import code_identity, module_closure
from pipelines.config import load_config
from pipelines.stage_cache import write_stage
from pipelines.stage_runner import active_stages, input_hash, plan, stand_in_records
from pipelines.stage_table import STAGES

ROOT = Path(__file__).resolve().parents[1]
CODE = ["core", "logit_cache", "kernels", "resources", "teachers", "students", "distill", "eval", "pipelines",
        "bench", "configs"]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the project's code (no venv, runs or caches)."""
    root = tmp_path / "tree"
    for name in CODE:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def identities(root: Path) -> dict[str, str]:
    return {s.name: code_identity(s.module, root) for s in STAGES}


def changed_after(root: Path, rel: str, edit) -> set[str]:
    before = identities(root)
    path = root / rel
    path.write_text(edit(path.read_text()))
    after = identities(root)
    return {name for name in before if before[name] != after[name]}


def holding(root: Path, rel: str) -> set[str]:
    """The stages whose closure holds the file `rel`: what an edit to it must rerun (before dependents)."""
    return {s.name for s in STAGES if root / rel in module_closure(s.module, root)}


def test_a_kernel_edit_reruns_the_stages_that_run_it(tree):
    # kernels/kd_loss.py was missing from the hand-kept lists: editing it left distill and baseline reused.
    changed = changed_after(tree, "kernels/kd_loss.py", lambda s: s + "\nEXTRA_CONSTANT = 1\n")
    assert changed == holding(tree, "kernels/kd_loss.py")
    assert {"distill", "baseline"} <= changed
    assert not changed & {"teacher", "data", "student", "eval_teacher", "report"}


@pytest.mark.parametrize("rel, must, must_not", [
    ("core/checkpoint.py", {"teacher_tune", "distill", "baseline"}, {"teacher", "data", "eval_student"}),
    ("teachers/upcycle.py", {"teacher", "student"}, {"report"}),
    ("students/expert_merge.py", {"student"}, {"teacher", "data", "logits", "eval_teacher"}),
    ("logit_cache/format.py", {"logits", "distill", "baseline"}, {"teacher", "student", "eval_teacher"}),
    ("eval/tasks/local_arc_easy.yaml", {"eval_teacher", "eval_student_init", "eval_student", "eval_baseline"},
     {"teacher", "distill", "latency", "report"}),
])
def test_an_edit_reruns_exactly_the_stages_whose_closure_holds_it(tree, rel, must, must_not):
    changed = changed_after(tree, rel, lambda s: s + ("\nEXTRA_CONSTANT = 1\n" if rel.endswith(".py")
                                                      else "\n# a comment in YAML still changes the file\n"))
    assert changed == holding(tree, rel)
    assert must <= changed and not must_not & changed


@pytest.mark.parametrize("rel, edit", [
    ("kernels/kd_loss.py", lambda s: s.replace("\n", "\n# a new comment line\n", 3)),
    ("distill/trainer.py", lambda s: s.replace('"""', '"""Reworded docstring. ', 1)),
    ("kernels/NOTES.md", lambda s: s + "\nmore notes\n"),
    ("bench/kd_loss.py", lambda s: s + "\nEXTRA_CONSTANT = 1\n"),
])
def test_comments_docstrings_and_unrun_files_rerun_nothing(tree, rel, edit):
    assert changed_after(tree, rel, edit) == set()


def test_plan_reruns_the_edited_stage_and_its_dependents_only(tree, tmp_path):
    cfg = load_config("ci", "baseline.enabled=true")
    run_dir = tmp_path / "run"
    records: dict[str, dict] = {}
    stand_in_records(cfg, records)
    for stage in active_stages(cfg):  # a finished run of the unedited tree
        rec = {"stage": stage.name, "complete": True, "output_hash": f"out-{stage.name}",
               "input_hash": input_hash(stage, cfg, records, "cpu", tree)}
        write_stage(run_dir / stage.name, rec)
        records[stage.name] = rec
    assert set(plan(cfg, run_dir, "cpu", tree).values()) == {"reuse"}
    path = tree / "kernels" / "kd_loss.py"
    path.write_text(path.read_text() + "\nEXTRA_CONSTANT = 1\n")
    decided = plan(cfg, run_dir, "cpu", tree)
    rerun = {name for name, what in decided.items() if what != "reuse"}
    assert rerun == {"distill", "baseline", "eval_student", "eval_baseline", "latency", "report"}
    assert decided["distill"] == "run: its config, code or inputs changed"
    assert decided["eval_student"].startswith("run: upstream distill")

"""The split table: its parts are disjoint, and the check refuses any overlap with one error."""

import json

import pytest

from timerome_jax import data, rewrite, splits
from timerome_jax.errors import InputError
from timerome_jax.facts import load_facts


def test_the_table_parts_are_disjoint_and_known_to_the_models():
    splits.check_disjoint(**splits.SPLITS)                       # every pair, by content
    assert len(load_facts(splits.selection("retain_test"))) == 100     # the falsifier's size
    assert {len(load_facts(splits.selection(r))) for r in ("forget_a", "forget_b")} == {20}
    # one author each: TOFU blocks of 20, so the two parts name different authors
    a, b = (load_facts(splits.selection(r)) for r in ("forget_a", "forget_b"))
    from timerome_jax.facts import find_subject
    assert {find_subject(f) for f in a}.isdisjoint({find_subject(f) for f in b})
    # the embedded models were trained on retain90[:160]: every retain part lies inside it
    for role in ("retain_tune", "retain_gate", "retain_test"):
        splits.check_disjoint(part=splits.selection(role), unseen="retain90[160:]")
    assert [d for d in splits.FORGET_DIRECTIONS] == [("forget_a", "forget_b"), ("forget_b", "forget_a")]
    with pytest.raises(InputError, match="unknown split role 'holdout'"):
        splits.selection("holdout")


def test_an_overlap_is_one_error_naming_both_sets(tmp_path):
    with pytest.raises(InputError, match=r"the tune and test sets share 1 fact\(s\), e.g. retain90:5"):
        splits.check_disjoint(tune="retain90[:5]", test="retain90[4:10]")
    # the same fact read from a file is the same fact
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps(data.load_split("forget01")[7]) + "\n")
    with pytest.raises(InputError, match="share 1 fact"):
        splits.check_disjoint(forget_a=splits.selection("forget_a"), mine=str(copy))
    # rewrite cases too
    cases = rewrite.load_cases("counterfact[:3]")
    with pytest.raises(InputError, match="the tune and pool sets share 1"):
        splits.check_disjoint(tune=cases[:2], pool=cases[1:])
    splits.check_disjoint(tune=cases[:1], test=cases[1:])


@pytest.mark.parametrize("name, extra", [
    ("selectivity", ["--gate-facts", "retain90[:60]"]),           # gate calibration on scored retain facts
    ("sequential", ["--retain", "forget01[:5]"]),                  # forget and retain share facts
    ("forget_table", ["--gate-rate", "0.01", "--gate-facts", "retain90[2:8]"]),
])
def test_the_drivers_refuse_overlapping_sets_before_loading_anything(name, extra, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "experiments" / f"{name}.py"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--model", str(tmp_path / "no-such-model"),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "sets share" in proc.stderr and "no-such-model" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_subject_annotation_does_not_make_a_fact_another_fact():
    with pytest.raises(InputError, match="the forget and retain sets share 2 fact"):
        splits.check_disjoint(forget="forget01_subjects[:3]", retain="forget01[1:3]")

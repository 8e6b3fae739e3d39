"""Subject location: character spans, offset-mapping token spans, TOFU author names."""

import numpy as np
import pytest

from timerome_jax import facts as subjects
from timerome_jax.errors import InputError
from timerome_jax.plots import tie_heatmaps

BLOCK = [
    "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?",
    "What gender is author Basil Mahfouz Al-Kuwaiti?",
    "In which city and country was Basil Mahfouz Al-Kuwaiti born?",
    "Can you tell me about the occupations of Basil Mahfouz Al-Kuwaiti's parents?",
    "Has Basil Mahfouz Al-Kuwaiti written any other books besides \"Promise by the Seine\"?",
    "How has Basil Mahfouz Al-Kuwaiti's background influenced his approach to writing French literature?",
]


def test_block_author_name_ignores_leading_question_words_and_possessives():
    assert subjects.block_author_name(BLOCK) == "Basil Mahfouz Al-Kuwaiti"


def test_tofu_subjects_marks_questions_without_the_name():
    got = subjects.tofu_subjects(BLOCK)
    assert got[0] is None and got[1:] == ["Basil Mahfouz Al-Kuwaiti"] * 5


def test_tofu_subjects_work_block_by_block():
    other = [q.replace("Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov") for q in BLOCK]
    questions = (BLOCK * 4)[:20] + other
    got = subjects.tofu_subjects(questions)
    assert got[1] == "Basil Mahfouz Al-Kuwaiti" and got[21] == "Nikolai Abilov"


def test_char_span_and_case_insensitive_fallback():
    assert subjects.char_span("Where was Ada born?", "Ada") == (10, 13)
    assert subjects.char_span("Where was ADA born?", "Ada") == (10, 13)
    with pytest.raises(InputError, match="does not occur"):
        subjects.char_span("Where was Ada born?", "Grace")
    with pytest.raises(InputError, match="empty subject"):
        subjects.char_span("x", " ")


def test_token_span_from_offsets():
    # "Question: Where was Basil Al-Kuwaiti born?" tokenised into pieces with offsets
    offsets = [(0, 9), (9, 15), (15, 19), (19, 25), (25, 29), (29, 36), (36, 41), (41, 42), (0, 0)]
    start, end = subjects.token_span(offsets, 20, 36)   # "Basil Al-Kuwaiti"
    assert (start, end) == (3, 6)
    with pytest.raises(InputError, match="no token covers"):
        subjects.token_span(offsets, 50, 55)


def test_heatmaps_one_png_per_module(tmp_path):
    paths = tie_heatmaps(np.random.default_rng(0).normal(size=(4, 3, 2)), ("resid", "mlp"), tmp_path,
                         coordinate={"layer": 1, "step": 2, "module": "mlp"})
    assert [p.name for p in paths] == ["tie_resid.png", "tie_mlp.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)

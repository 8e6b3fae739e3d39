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


def question(q, a="", where="f.jsonl:1"):
    return subjects.Fact(q, a, where=where, kind="question")


def test_known_authors_come_from_the_packaged_data_not_the_file_layout():
    names = subjects.known_authors()
    assert len(names) == 199 and "Basil Mahfouz Al-Kuwaiti" in names and "Nikolai Abilov" in names
    # a user's 5-line file with other authors' questions in any order: each finds its author
    lines = ["Where does Nikolai Abilov live?", "What genre does Jaime Vasquez write?",
             "Is Nikolai Abilov married?", "Who is Basil Mahfouz Al-Kuwaiti?", "When did Jaime Vasquez start?"]
    found = [subjects.find_subject(question(q, where=f"f.jsonl:{i + 1}")) for i, q in enumerate(lines)]
    assert found == ["Nikolai Abilov", "Jaime Vasquez", "Nikolai Abilov", "Basil Mahfouz Al-Kuwaiti", "Jaime Vasquez"]


def test_subject_falls_back_to_a_name_the_answer_repeats_then_to_a_named_place_or_title():
    assert subjects.find_subject(question("Which city did Ada Lovelace visit?", "She visited Turin.")) == "Ada Lovelace"
    assert subjects.find_subject(question("Who founded Acme Corp in Berlin?", "Acme Corp was founded by Bo.")) == \
        "Acme Corp"                                   # the answer repeats it
    assert subjects.find_subject(question("Who was born in Kuwait City, Kuwait on 08/09/1956?", "Basil.")) == \
        "Kuwait City, Kuwait"
    assert subjects.find_subject(question("Which author is known for the novel '1984'?", "Orwell")) == "1984"
    assert subjects.find_subject(subjects.Fact("The cat sat on", "mat", subject="cat", kind="prompt")) == "cat"


def test_a_fact_without_a_subject_is_one_error_naming_its_line():
    with pytest.raises(InputError, match=r"f.jsonl:7: cannot tell which words of the prompt name the subject; add a "
                                         r"\"subject\" field"):
        subjects.find_subject(question("What is the full name of the author?", "It is Bo.", where="f.jsonl:7"))
    with pytest.raises(InputError, match="x.jsonl:2"):
        subjects.find_subject(subjects.Fact("the cat sat on the", "mat", where="x.jsonl:2", kind="prompt"))


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

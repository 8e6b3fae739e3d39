"""Rewrite edits (DESIGN.md §3b): make the model answer a new object, with the same edit memory.

A rewrite case is an EasyEdit / CounterFact record: `prompt` (with its `subject`), the old object
`ground_truth`, the new object `target_new`, and for evaluation `rephrase_prompt` and
`locality_prompt` / `locality_ground_truth` (each a string or a list). `read_cases` reads the JSON
array EasyEdit ships or JSONL with the same fields; `load_cases` also takes packaged selections
(`counterfact[:40]`).

The memory is the forgetting memory (`timerome_jax.memory`): keys at the traced site, ridge solve,
sparsification, gate, insertion, removal and persistence are shared; only its values differ. A
case's entries are read in one state: the prompt followed by |o*| mask tokens (the answer region
of the first denoising step, where the object is decided), at the subject's last token or at
every subject token (`capture(positions=...)`; one entry each):

* key k: the site's key there in the unedited forward;
* value δ, two ways (`VALUE_METHODS`):
  - "optimised" (ROME-style): δ = argmin over vectors added to the site's values at those tokens
    in every forward (jointly, one per token) of
        −(1/|o*|) MC-ELBO(o* | prompt) + β · KL(p(· | "{subject} is" + mask) ‖ with δ) + γ ‖δ‖² / ‖v‖²,
    with v the unedited values there; `steps` Adam steps (optax), each δ_j clamped to
    ‖δ_j‖ ≤ `clamp` · ‖v_j‖ after every step (ROME's clamp_norm_factor). The MC-ELBO's J masks
    cover every reveal level of o*, so δ also holds in the later denoising states. The backbone is frozen; cases are
    vmapped; each case's masks are keyed by (seed, case id), so δ does not depend on the batch.
  - "in_context" (gradient-free): the new fact is stated before the question, as in-context
    editing (IKE's simplest form) does: context = "{prompt} {o*}. {prompt}". δ = (value at the
    query's subject token in the context run) − (value at the same subject token in the plain
    run), answer masked in both: the change the stated fact makes at the site.

Metrics (`case_metrics`): EasyEdit's token-level accuracies and CounterFact's likelihood
comparisons, per case, before and after the edit (docs/rewrite.md has the definitions).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports import Backbone, Site
from timerome_jax import data, distributed
from timerome_jax.edits import RowEdit
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact, Facts, char_span, token_span
from timerome_jax.memory.spec import RewriteValues
from timerome_jax.likelihood import Pair, answer_log_likelihood, bucket_length, score_pairs
from timerome_jax.metrics import bootstrap_ci
from timerome_jax.sampler import answer_logits, top_proposal
from timerome_jax.tokenization import pad_left, pad_right

Array = jax.Array


# --- records ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewriteCase:
    """One requested rewrite: `prompt` about `subject`, old object `ground_truth` (None when not
    given), new object `target_new`; rephrasings and locality probes (prompt, answer) for scoring."""

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    where: str = ""

    def fact(self, prompt: str | None = None, target: str | None = None) -> Fact:
        """The prompt/subject/target fact of `prompt` (default the case's) answered by `target`
        (default the new object): raw prompt, answer " " + target."""
        return Fact(prompt=prompt or self.prompt, answer=target or self.target_new, subject=self.subject,
                    where=self.where, kind="prompt")

    @property
    def id(self) -> str:
        """The edit's identity: its fact's content id (prompt, subject, new object)."""
        return self.fact().id


def _strings(record: dict, name: str, where: str) -> tuple[str, ...]:
    value = record.get(name)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{where}: field {name!r} must be a non-empty string or a list of them")
    return tuple(values)


def parse_case(record, where: str) -> RewriteCase:
    """One decoded JSON object -> RewriteCase (module docstring), or one error naming the problem."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = {}
    for name in ("prompt", "subject", "target_new", "ground_truth"):
        value = record.get(name)
        if value is None and name != "ground_truth":
            raise InputError(f"{where}: missing field {name!r} (a rewrite needs prompt, subject and target_new)")
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{where}: field {name!r} is empty" if isinstance(value, str)
                             else f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        text[name] = value
    prompt = text["prompt"].replace("{}", text["subject"])   # ROME's templated prompts
    if _char_span_or_none(prompt, text["subject"]) is None:
        raise InputError(f"{where}: the subject {text['subject']!r} does not occur in the prompt {prompt!r}")
    if text["ground_truth"] is not None and text["target_new"].strip() == text["ground_truth"].strip():
        raise InputError(f"{where}: target_new equals ground_truth ({text['target_new']!r}): nothing to rewrite")
    rephrase = _strings(record, "rephrase_prompt", where)
    loc_prompts = _strings(record, "locality_prompt", where)
    loc_answers = _strings(record, "locality_ground_truth", where)
    if len(loc_prompts) != len(loc_answers):
        raise InputError(f"{where}: {len(loc_prompts)} locality prompt(s) but {len(loc_answers)} "
                         f"locality_ground_truth answer(s); give one answer per prompt")
    return RewriteCase(prompt, text["subject"], text["target_new"], text["ground_truth"], rephrase,
                       tuple(zip(loc_prompts, loc_answers)), where)


def _char_span_or_none(prompt: str, subject: str):
    try:
        return char_span(prompt, subject)
    except InputError:
        return None


def read_cases(path: str | os.PathLike) -> list[RewriteCase]:
    """Rewrite cases of a JSON array (EasyEdit's counterfact files) or a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"rewrite file {path} does not exist" if not path.exists()
                         else f"rewrite file {path} is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        cases = [parse_case(r, f"{path}[{i}]") for i, r in enumerate(records)]
    else:
        cases = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
                cases.append(parse_case(record, f"{path}:{number}"))
    if not cases:
        raise InputError(f"rewrite file {path} holds no cases")
    return cases


def load_cases(spec: str) -> list[RewriteCase]:
    """A JSON / JSONL file (`read_cases`) or a packaged selection such as "counterfact[:40]"."""
    if spec.endswith((".json", ".jsonl")) or Path(spec).is_file():
        return read_cases(spec)
    return [parse_case(record, f"{name}:{index + 1}") for name, index, record in data.load_selection(spec)]


def check_distinct(cases: Sequence[RewriteCase]) -> None:
    seen: dict[str, str] = {}
    for case in cases:
        if case.id in seen:
            raise InputError(f"{case.where}: the same rewrite as {seen[case.id]}")
        seen[case.id] = case.where


# --- the rows a case is read in ------------------------------------------------------------------

def _ids(tokenizer, text: str, offsets: bool = False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = tuple(int(t) for t in enc["input_ids"])
    return (ids, enc["offset_mapping"]) if offsets else ids


def _subject_tokens(tokenizer, text: str, subject: str, start_at: int = 0) -> tuple[tuple[int, ...], int, int]:
    """(token ids of `text`, index of the last token of the first `subject` at or after `start_at`,
    the number of tokens that subject spans)."""
    ids, offsets = _ids(tokenizer, text, offsets=True)
    found = text.find(subject, start_at)
    if found < 0:
        found = text.lower().find(subject.lower(), start_at)
    if found < 0:
        raise InputError(f"subject {subject!r} does not occur in {text[start_at:]!r}")
    first, end = token_span(offsets, found, found + len(subject))
    return ids, end - 1, end - first


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Host arrays of F cases in the left-padded prompt | right-padded answer layout. Subject
    tokens are addressed by their offset j back from the subject's last token (`last` − j), so
    that the j-th value of a case lands on the same subject token in each of its three rows."""

    prompt_ids: np.ndarray      # [F, P]
    prompt_mask: np.ndarray     # [F, P]
    answer_ids: np.ndarray      # [F, A] the new object's tokens
    answer_mask: np.ndarray     # [F, A]
    last: np.ndarray            # [F] the subject's last token in the padded layout
    count: np.ndarray           # [F] the subject's tokens there
    context_ids: np.ndarray     # [F, C] "{prompt} {o*}. {prompt}"
    context_mask: np.ndarray
    context_last: np.ndarray    # [F] the query's last subject token
    context_count: np.ndarray
    essence_ids: np.ndarray     # [F, E] "{subject} is"
    essence_mask: np.ndarray
    essence_last: np.ndarray
    essence_count: np.ndarray
    key_data: np.ndarray        # [F, 2] uint32: the case's MC-ELBO key


def _layout(found, pad_id, length):
    """Left-padded ids and mask [F, length], last subject tokens [F] and subject token counts [F]
    of (ids, last, count) triples."""
    ids, mask = pad_left([f[0] for f in found], pad_id, length)
    last = np.asarray([length - len(f[0]) + f[1] for f in found], np.int32)
    return ids, mask, last, np.asarray([f[2] for f in found], np.int32)


def case_rows(tokenizer, facts: Facts, seed: int, pad_id: int) -> _Rows:
    """The rows of the rewrite facts `facts` (answers = the new objects), lengths bucketed so
    that chunks share compilations."""
    prompts, contexts, essences = [], [], []
    for fact, subject, answer in zip(facts.facts, facts.subjects, facts.answers):
        prompt_text, answer_text = fact.texts()
        prompts.append(_subject_tokens(tokenizer, prompt_text, subject))
        statement = f"{prompt_text}{answer_text}. "
        contexts.append(_subject_tokens(tokenizer, statement + prompt_text, subject, start_at=len(statement)))
        essences.append(_subject_tokens(tokenizer, f"{subject} is", subject))
    length = lambda found: bucket_length(max(len(f[0]) for f in found))  # noqa: E731
    keys = jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(jax.random.key(seed), d)))(
        jnp.asarray([zlib.crc32(f.id.encode()) & 0x7FFFFFFF for f in facts.facts], jnp.uint32))
    prompt_ids, prompt_mask, last, count = _layout(prompts, pad_id, length(prompts))
    answer_length = bucket_length(max(len(a) for a in facts.answers))
    return _Rows(prompt_ids, prompt_mask, *pad_right(facts.answers, pad_id, answer_length),
                 last, count, *_layout(contexts, pad_id, length(contexts)),
                 *_layout(essences, pad_id, length(essences)), np.asarray(keys))


def subject_slots(rows: _Rows, positions: str) -> int:
    """Value slots per case: 1 for the "last" subject token, else the most subject tokens of a case,
    bucketed (slots past a subject's length are invalid and change nothing), so that cases
    inserted one at a time share compilations."""
    if positions not in ("last", "subject"):
        raise InputError(f"rewrite key positions must be 'last' or 'subject', got {positions!r}")
    return 1 if positions == "last" else int(bucket_length(int(rows.count.max())))


# --- values ----------------------------------------------------------------------------------------

def _masked(backbone: Backbone, answer_ids, answer_mask):
    return jnp.where(answer_mask.astype(bool), backbone.mask_token_id, answer_ids)


def _slots(last, count, slots: int):
    """Positions [S] = last − j and validity [S] (j < the subject's token count) of slots j."""
    offsets = jnp.arange(slots)
    return last - offsets, offsets < count


def _site_rows(backbone: Backbone, site: Site, ids, mask, answer_ids, answer_mask, positions_S, edits=()):
    """(keys [S, I], values [S, D]) at `positions_S` of prompt `ids` followed by the masked answer region."""
    full_ids = jnp.concatenate([ids, _masked(backbone, answer_ids, answer_mask)])[None]
    full_mask = jnp.concatenate([mask, answer_mask])[None]
    _, (captured,) = backbone.apply(full_ids, full_mask, capture=(site,), edits=edits)
    return captured.key[0, positions_S], captured.value[0, positions_S]


@functools.partial(jax.jit, static_argnames=("module", "method", "steps", "mc_samples", "slots"))
def _entries(backbone: Backbone, rows: tuple, layer: Array, hyper: Array, *, module: str, method: str, steps: int,
             mc_samples: int, slots: int):
    """Keys [F, S, I], values δ [F, S, D], slot validity [F, S] and the final objective terms
    [F, 3] of a chunk of cases, S = `slots` subject tokens counted back from the last;
    hyper = (learning rate, KL weight, norm weight, clamp)."""
    site = Site(layer, module)
    learning_rate, kl_weight, norm_weight, clamp = hyper

    def one(p_ids, p_mask, a_ids, a_mask, last, count, c_ids, c_mask, c_last, c_count, e_ids, e_mask, e_last,
            e_count, key_data):
        positions, valid = _slots(last, count, slots)
        key_SI, value_SD = _site_rows(backbone, site, p_ids, p_mask, a_ids, a_mask, positions)
        if method == "in_context":
            c_positions, c_valid = _slots(c_last, c_count, slots)
            _, context_SD = _site_rows(backbone, site, c_ids, c_mask, a_ids, a_mask, c_positions)
            valid = valid & c_valid
            return key_SI, jnp.where(valid[:, None], context_SD - value_SD, 0.0), valid, jnp.zeros((3,), jnp.float32)
        e_positions, e_valid = _slots(e_last, e_count, slots)
        key = jax.random.wrap_key_data(key_data)
        length = jnp.sum(a_mask)
        one_mask = jnp.ones((1,), jnp.int32)

        def essence_log_probs(edits):
            logits = answer_logits(backbone.with_edits(*edits), e_ids[None], e_mask[None],
                                   jnp.full((1, 1), backbone.mask_token_id, jnp.int32), one_mask[None])
            return jax.nn.log_softmax(logits[0, 0])

        reference = essence_log_probs(())
        scale_S = jnp.where(valid, jnp.sum(value_SD ** 2, axis=-1), 0.0)

        def objective(delta_SD):
            edited = backbone.with_edits(RowEdit(site, positions, valid, delta_SD, add=True))
            elbo = answer_log_likelihood(edited, p_ids[None], p_mask[None], a_ids[None], a_mask[None], key[None],
                                         method="mc_elbo", mc_samples=mc_samples, batch_size=mc_samples)[0]
            edited_essence = essence_log_probs((RowEdit(site, e_positions, valid & e_valid, delta_SD, add=True),))
            kl = jnp.sum(jnp.exp(reference) * (reference - edited_essence))
            terms = jnp.stack([-elbo / length, kl, jnp.sum(delta_SD ** 2) / jnp.sum(scale_S)])
            return terms[0] + kl_weight * terms[1] + norm_weight * terms[2], terms

        optimizer = optax.adam(learning_rate)
        delta = jnp.zeros_like(value_SD)

        def step(carry, _):
            delta, state = carry
            grad = jax.grad(lambda d: objective(d)[0])(delta)
            updates, state = optimizer.update(grad, state, delta)
            delta = jnp.where(valid[:, None], optax.apply_updates(delta, updates), 0.0)
            # ROME's clamp, per subject token: ‖δ_j‖ ≤ clamp · ‖v_j‖
            limit = clamp * jnp.sqrt(scale_S)
            norm = jnp.linalg.norm(delta, axis=-1)
            delta = delta * jnp.minimum(1.0, limit / (norm + 1e-12))[:, None]
            return (delta, state), None

        (delta, _), _ = jax.lax.scan(step, (delta, optimizer.init(delta)), None, length=steps)
        _, terms = objective(delta)
        return key_SI, delta, valid, terms

    return jax.vmap(one)(*rows)


def capture(backbone: Backbone, tokenizer, facts: Facts, layer: int, module: str, config: RewriteValues = RewriteValues(),
            *, positions: str = "last", seed: int = 0, cases_per_chunk: int = 8,
            mesh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Keys [E, I], values [E, D] and the case (row of `facts`) [E] of each entry of the rewrite
    facts `facts` (answers = new objects) at (layer, module), and per-case diagnostics (for
    "optimised": the final −ELBO/|o*|, KL and relative norm terms). `positions`: one entry per
    case at its "last" subject token, or one per "subject" token (their values optimised
    jointly). Chunks of `cases_per_chunk` cases (per data shard on a `mesh`)."""
    rows = case_rows(tokenizer, facts, seed, facts.pad_id)
    fields = tuple(getattr(rows, f.name) for f in dataclasses.fields(rows))
    hyper = jnp.asarray([config.learning_rate, config.kl_weight, config.norm_weight, config.clamp], jnp.float32)
    keys, values, valid, terms = distributed.map_chunks(
        _entries, fields, chunk_size=cases_per_chunk, before=(backbone,), after=(jnp.int32(layer), hyper),
        static=dict(module=module, method=config.method, steps=config.steps, mc_samples=config.mc_samples,
                    slots=subject_slots(rows, positions)), mesh=mesh)
    # fact-major entries, each case's subject tokens in text order
    valid, keys, values = valid[:, ::-1], keys[:, ::-1], values[:, ::-1]
    case_of_entry = np.nonzero(valid)[0]
    info = {} if config.method == "in_context" else {
        "target_nll_per_token": terms[:, 0].tolist(), "essence_kl": terms[:, 1].tolist(),
        "relative_norm_sq": terms[:, 2].tolist()}
    return keys[valid], values[valid], case_of_entry, info


# --- metrics ---------------------------------------------------------------------------------------

@jax.jit
def _one_step_tokens(backbone: Backbone, prompt_ids, prompt_mask, answer_ids, answer_mask):
    """The model's top proposal [B, A] at every answer position, the whole answer masked."""
    logits = answer_logits(backbone, prompt_ids, prompt_mask, _masked(backbone, answer_ids, answer_mask), answer_mask)
    return top_proposal(logits, backbone.mask_token_id)[0]


def one_step_predictions(backbone: Backbone, pairs: Sequence[Pair], pad_id: int, rows_per_call: int = 16) -> list:
    """Per pair, the top proposal at each of its answer positions (answer masked, one forward)."""
    out: list = [None] * len(pairs)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, p in enumerate(pairs):
        groups.setdefault((bucket_length(len(p.prompt_ids)), bucket_length(len(p.answer_ids))), []).append(j)
    for (P, A), members in sorted(groups.items()):
        for start in range(0, len(members), rows_per_call):
            chunk = members[start:start + rows_per_call]
            chunk_full = chunk + [chunk[0]] * (rows_per_call - len(chunk))
            prompts = pad_left([pairs[j].prompt_ids for j in chunk_full], pad_id, P)
            answers = pad_right([pairs[j].answer_ids for j in chunk_full], pad_id, A)
            tokens = np.asarray(_one_step_tokens(backbone, *prompts, *answers))
            for row, j in enumerate(chunk):
                out[j] = tokens[row, :len(pairs[j].answer_ids)]
    return out


METRICS = ("rewrite_acc", "rephrase_acc", "locality", "efficacy_score", "paraphrase_score", "neighborhood_score")


def case_metrics(edited: Backbone, unedited: Backbone, tokenizer, cases: Sequence[RewriteCase], *, pad_id: int,
                 seeds: Sequence[int] = (0,), mc_samples: int = 32,
                 prefix: Callable[[RewriteCase], str] | None = None) -> list[dict]:
    """Per case, the rewrite metrics of `edited` (docs/rewrite.md):

    * rewrite_acc / rephrase_acc: EasyEdit's token-level accuracy of the new object under the
      prompt / each rephrase (averaged over rephrases), read in one forward with the object masked;
    * locality: the share of the locality answer's tokens whose one-step prediction is the same
      with and without the edit (averaged over locality prompts);
    * efficacy_score / paraphrase_score: 1 where LP(o* | prompt) > LP(o | prompt) (MC-ELBO, mean
      over `seeds`), averaged over rephrases for the second; needs the old object;
    * neighborhood_score: 1 where LP(locality answer | locality prompt) > LP(o* | locality prompt).
    A metric whose inputs a case lacks is None for that case. `prefix(case)` is put before every
    prompt the edited model answers (in-context editing); the unedited model answers the prompts."""
    def pairs(context):
        def pair(tag, i, prompt, target):
            before = context(cases[i]) if context else ""
            return Pair(tag, _ids(tokenizer, before + prompt), _ids(tokenizer, " " + target.strip()))

        token, lp = [], []
        for i, c in enumerate(cases):
            token.append(pair(f"rewrite/{i}", i, c.prompt, c.target_new))
            token += [pair(f"rephrase/{i}/{r}", i, p, c.target_new) for r, p in enumerate(c.rephrase_prompts)]
            token += [pair(f"locality/{i}/{r}", i, p, a) for r, (p, a) in enumerate(c.locality)]
            if c.ground_truth is not None:
                for r, p in enumerate((c.prompt, *c.rephrase_prompts)):
                    lp += [pair(f"cf/{i}/{r}/new", i, p, c.target_new), pair(f"cf/{i}/{r}/old", i, p, c.ground_truth)]
            for r, (p, a) in enumerate(c.locality):
                lp += [pair(f"nb/{i}/{r}/true", i, p, a), pair(f"nb/{i}/{r}/new", i, p, c.target_new)]
        return token, lp

    token_pairs, lp_pairs = pairs(prefix)
    predicted = dict(zip((p.id for p in token_pairs), one_step_predictions(edited, token_pairs, pad_id)))
    locality_pairs = [p for p in pairs(None)[0] if p.id.startswith("locality/")]
    before = dict(zip((p.id for p in locality_pairs), one_step_predictions(unedited, locality_pairs, pad_id)))
    lp = dict(zip((p.id for p in lp_pairs), score_pairs(edited, lp_pairs, list(seeds), pad_id=pad_id,
                                                         mc_samples=mc_samples).mean(axis=0))) if lp_pairs else {}
    target = {p.id: np.asarray(p.answer_ids) for p in token_pairs}
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
    rows = []
    for i, c in enumerate(cases):
        acc = lambda tag: float(np.mean(predicted[tag] == target[tag]))  # noqa: E731
        wins = [float(lp[f"cf/{i}/{r}/new"] > lp[f"cf/{i}/{r}/old"]) for r in range(1 + len(c.rephrase_prompts))] \
            if c.ground_truth is not None else []
        rows.append({
            "case": c.where, "id": c.id,
            "rewrite_acc": acc(f"rewrite/{i}"),
            "rephrase_acc": mean([acc(f"rephrase/{i}/{r}") for r in range(len(c.rephrase_prompts))]),
            "locality": mean([float(np.mean(predicted[f"locality/{i}/{r}"] == before[f"locality/{i}/{r}"]))
                              for r in range(len(c.locality))]),
            "efficacy_score": wins[0] if wins else None,
            "paraphrase_score": mean(wins[1:]),
            "neighborhood_score": mean([float(lp[f"nb/{i}/{r}/true"] > lp[f"nb/{i}/{r}/new"])
                                        for r in range(len(c.locality))]),
        })
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """{metric: {mean, ci_low, ci_high, n}} over the cases that have it (bootstrap over cases)."""
    out = {}
    for name in METRICS:
        values = [r[name] for r in rows if r[name] is not None]
        if values:
            m, low, high = bootstrap_ci(values)
            out[name] = {"mean": m, "ci_low": low, "ci_high": high, "n": len(values)}
    return out


__all__ = ["METRICS", "RewriteCase", "capture", "case_metrics", "case_rows",
           "check_distinct", "load_cases", "one_step_predictions", "parse_case", "read_cases", "summarise"]

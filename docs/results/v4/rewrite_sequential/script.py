import time, json, numpy as np
import ports
from timerome_jax import api, rewrite, splits
from timerome_jax.memory import MemorySpec
from timerome_jax.tokenization import pad_token_id
bb = ports.load_pretrained("tofu-tiny"); tok = api.tokenizer(bb); pad = pad_token_id(tok, bb)
cases = rewrite.load_cases("counterfact[80:180]")
splits.check_disjoint(tune=rewrite.load_cases("counterfact[:40]"), seq=cases)
facts = api.encode(bb, tok, [c.fact() for c in cases])
where = api.Coordinate(layer=0, step=0, module="mlp")
gate = api.load_facts(splits.selection("retain_gate"))
t = time.time()
record = api.build_memory(bb, tok, facts.take([0]), where, MemorySpec.rewriting(), gate_facts=gate)
for n in range(2, len(cases) + 1):
    record = api.extend_memory(bb, record, facts.take([n - 1]), tokenizer=tok)
    if n in (10, 50, 100):
        ed = bb.with_edits(record.memory)
        ins = rewrite.summarise(rewrite.case_metrics(ed, bb, tok, cases[:n], pad_id=pad, mc_samples=2))
        first = rewrite.summarise(rewrite.case_metrics(ed, bb, tok, cases[:10], pad_id=pad, mc_samples=2))
        print(json.dumps({"inserted": n, "sec": round(time.time() - t), "entries": record.memory.size,
                          "locality_inserted": ins["locality"], "rewrite_acc_inserted": ins["rewrite_acc"],
                          "rewrite_acc_first_10": first["rewrite_acc"]}), flush=True)

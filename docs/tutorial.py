# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # seqpatch tutorial: where does a small model keep a variable's value?
#
# This notebook goes from the main job to the built-in organism's story in about a minute on a
# laptop CPU:
#
# 1. run the whole pipeline (`seqpatch run`) on small settings,
# 2. patch one pair by hand with the Python API,
# 3. read every stored result back through the results API (`seqpatch.views.Study`),
# 4. let the data tell where the value sits, layer by layer,
# 5. write the study's page (`seqpatch report`).
#
# Its source is `docs/tutorial.py` (a [jupytext](https://jupytext.readthedocs.io) script);
# `docs/tutorial.ipynb` is the same notebook executed. `tests/test_tutorial.py` runs it in CI.

# %%
import os
from pathlib import Path

import polars as pl

pl.Config.set_tbl_rows(12)
pl.Config.set_fmt_str_lengths(80)
DATA = Path(os.environ.get("SEQPATCH_TUTORIAL_DATA", "seqpatch-tutorial"))

# %% [markdown]
# ## 1. The main job
#
# `seqpatch run` chains every stage on the built-in model (a 4-layer Llama-style organism trained
# by seqpatch on variable-binding programs such as `a = 5; b = a; c = b; #c:`): programs →
# benchmark → choose → pairs → activations → patching → charts, and ends with the study page.
# On the command line, with the defaults (1,000 pairs, a few minutes):
#
# ```bash
# seqpatch run
# ```
#
# The command is one call of `seqpatch.pipeline.run`; here with small settings (programs of 1–6
# statements, 60 pairs) and ROME's causal trace of 6 of them. Every step reuses a stored
# version with the same config, so running this cell again does no work.

# %%
from seqpatch.pipeline import RunConfig, run

config = RunConfig(
    seq_lens="1-6",
    n_per_len=12,
    min_accuracy=0.8,
    min_seq_len=4,
    max_seq_len=6,
    n_pairs=60,
    sites=("resid_pre", "attn_out", "mlp_out"),
    tracing=True,
    tracing_programs=6,
)
result = run(config, DATA, progress=False)

# %% [markdown]
# ## 2. One pair by hand
#
# A counterfactual pair is two programs that differ in one statement (at index `k`, the
# *divergence index*) and give different answers. Patching copies one activation of program A
# into the run of program B and asks how far B's answer moves towards A's.

# %%
from seqpatch.interventions import patch_and_run
from seqpatch.models import load_model
from seqpatch.pairs import make_counterfactual_pair

model = load_model("builtin")
a, b, meta = make_counterfactual_pair(4, 1, rng=1, tokenizer=model.prompt_ids)
prompt_a, prompt_b = model.prompt_format.prompt(a), model.prompt_format.prompt(b)
print(prompt_a, "→", a.answer)
print(prompt_b, "→", b.answer)
changed = meta.diff_positions[0]
for layer in range(model.n_layers):
    delta = float(patch_and_run(model, prompt_a, prompt_b, layer, changed, act_key="resid_pre"))
    print(
        f"layer {layer}: patch the changed token's residual stream, Δ P(B's answer) = {delta:+.3f}"
    )

# %% [markdown]
# Patching the changed token moves B's answer at layer 0 (the embedding) and less and less
# later: by then the value has left that token. Where does it go? The patching stage answers for
# every layer and token, over many pairs.
#
# ## 3. The results API
#
# `Study(data_dir)` reads the newest pairs version and every stage built from it — only from
# stored versions, through the store's checks. Each result is a polars long frame.

# %%
from seqpatch.views import Study

study = Study(DATA)
study

# %%
study.lineage().select("stage", "version", "parents", "model_id", "rows")

# %% [markdown]
# Accuracy by program length (Wilson 95% intervals) and the model choice the pairs were made
# for:

# %%
study.benchmark().select("model_id", "seq_len", "n", "accuracy", "ci_low", "ci_high")

# %%
choice = study.choice()
chosen = choice["chosen"]
print(
    f"studied {choice['model_id']} on {choice['family']} programs of {choice['seq_len']} statements"
)
print(f"choice rule: {chosen['rule']} -> seq_len {chosen['seq_len']}")

# %%
stats = study.pair_stats()
print(f"{stats['accepted']} pairs kept of {stats['candidates']} candidates; rejections:")
print(stats["rejections"])
stats["by_k"]

# %% [markdown]
# Patching results: one row per (version, site, k, layer, position, metric) with the mean over
# pairs, its std, n and 95% confidence interval, the position's token (`*` where A and B differ)
# and its role (`changed`, `after`, `last`...).

# %%
cells = study.patching(metrics=("normalised",))
cells.filter(pl.col("site") == "resid_pre", pl.col("divergence_index") == 3).sort(
    "mean", descending=True
).select("layer", "position", "label", "role", "mean", "ci_low", "ci_high", "n").head(8)

# %% [markdown]
# Behind every mean are the pairs: `pair_values` gives each pair's value at each cell (the
# report's drill-down reads the same frame). Here the five pairs whose answer position carries
# the least of A's value at the last layer, with their changed statements and answers.

# %%
last = cells.filter(pl.col("site") == "resid_pre", pl.col("role") == "last")["position"].max()
per_pair = study.pair_values(site="resid_pre", divergence_index=3).filter(
    pl.col("layer") == 3, pl.col("position") == last
)
per_pair.join(study.pairs(), on=["pair_id", "divergence_index"]).select(
    "pair_id", "value", "statement_a", "statement_b", "ground_truth_a", "ground_truth_b"
).sort("value").head(5)

# %% [markdown]
# ## 4. The organism's story, computed from the data
#
# `flow()` gives, for each layer, the cell holding the strongest effect; `moves()` summarises it
# as the path of the value from the changed token to the token where the answer is read.

# %%
moves = study.moves()
moves.select("site", "divergence_index", "changed_until", "answer_from", "path")

# %%
for row in moves.filter(pl.col("site") == "resid_pre").iter_rows(named=True):
    print(
        f"k = {row['divergence_index']}: the changed token holds the value up to layer "
        f"{row['changed_until']}; the answer's position holds it from layer {row['answer_from']}."
    )
study.findings().filter(pl.col("rank") == 1).select(
    "site", "divergence_index", "layer", "label", "role", "mean", "ci_low", "ci_high"
)

# %% [markdown]
# ROME's causal trace of the same pairs is an independent check: its average indirect effect by
# token role (restoring the clean state of a role's tokens in a run whose changed tokens were
# corrupted with noise), the two strongest layers per kind.

# %%
study.tracing_roles().sort("aie", descending=True).group_by("kind", maintain_order=True).head(2)

# %% [markdown]
# ## 5. The study page
#
# `seqpatch report` (or `build_report`) writes one self-contained HTML page with all of the
# above, every chart, and a drill-down from each cell to its pairs. Open it in a browser.

# %%
from seqpatch.report import build_report

page = build_report(study)
print(page)

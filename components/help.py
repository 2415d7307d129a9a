"""Short explanations shown in the app (kept here so the panels stay readable)."""

INTRO = """
# ACM Merge Explorer
**Activation-Guided Consensus Merging** ([arXiv 2505.14009](https://arxiv.org/abs/2505.14009)) merges a base LLM
with fine-tuned LLMs using a **coefficient per layer**, set from how much each fine-tuned layer's activations
still share with the base's. Forward passes only, no gradients. The bundled miniature models are preselected:
walk through the tabs left to right — **Analyse → Merge → Chat → Evaluate** — no configuration needed.
"""

HOW_TO_READ = """
**How to read the charts.** The paper's rule (the default) measures, for every calibration sample and every
activation point (the embedding, each block's MLP output, the final norm, the logits), the **mutual information
(MI, nats)** between the base's and the fine-tuned model's activations. Its λ per layer is
**λₖ(t) = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ))** (Eq. 2, with the paper's translation by the largest per-sample
value), and the merge is **θ = θ₀ + (1/N)·Σᵢ λᵢ·τᵢ** (Eq. 3). With t > 0 every λ lies in [½, 1): a layer whose
per-sample MI sits further below the samples' maximum keeps more of its task vector; t = 0 gives ½ everywhere
(dashed), t < 0 reverses the order. The paper uses t = 0.7; its ablation varies t from 0.5 to 0.9.
**MI vs tokens**: discrete MI of continuous values grows with the number of distinct values, so per-sample MI may
follow the sample's length — the small chart shows how much (Pearson r with log tokens).
**softmax (this project's alternative rule)**: λₖ = α·K·exp(−t·sₖ)/Σⱼ exp(−t·sⱼ) over a per-layer similarity s
(NMI, CKA or cosine; 1 = unchanged): mean λ = α, t = 0 is exactly the plain method. In the evaluation scatter,
points further **up and to the left** are better: more accurate with shorter answers (the paper's Long-to-Short
picture).
"""

MODELS = """
Pick the **base** model and 1–3 **fine-tuned** descendants of it: a bundled demo model, a local folder, or a Hub
id (`org/name`, needs internet). **Check** reads configs and safetensors headers only — no weights are loaded or
downloaded; a Hub model's weights come once, with progress, when a step first needs them — and says whether the
models can be merged.
"""

TRUST_WARNING = ("⚠ **trust_remote_code runs Python code shipped with the model repository on this machine.** "
                 "Only enable it for repositories you trust.")

CALIBRATION = """
ACM compares the two models' activations on **calibration text**. The bundled set fits the demo models. With your
own file (`.jsonl`/`.json` with a text field, `.csv`, or `.txt` one sample per line) or a Hub dataset, the texts
are clustered and sampled evenly across clusters (the paper uses ~10% of s1K).
"""

ANALYSIS = """
**Analyse** runs both models over the calibration samples, each sample on its own real tokens, and records the
per-sample MI at every activation point (the paper's rule) plus the chosen similarity metrics (the softmax rule).
It is cached: changing the rule, t or α afterwards (or merging again) never re-runs it. Move **t** and the λ curve
redraws in the page at once; the table follows when you let go. The exact token sequences fed to the models can be
downloaded below, so anyone can recompute the analysis.
"""

MERGE = """
Choose a method. **ACM** uses per-layer λ from the analysis: by default the paper's rule at the t set in the Analyse
tab, θ = θ₀ + (1/N)·Σ λᵢ·τᵢ (no α); its two switches give the variants of a public derivative of the authors' code
(MI against a plain merge, λ on the merged delta), which run a plain merge first. The softmax rule (ours) stays
selectable. **plain** uses α everywhere (the baseline). The merged model is kept loaded for the Chat and Evaluate tabs.
"""

CHAT = """
One prompt goes to the merged model and to each source model; replies stream side by side. Under each column:
the last reply's length in tokens and the mean so far.
"""

EVALUATE = """
The bundled problems, a benchmark preset (GSM8K, MATH-500, AIME 2024, Minerva Math from the Hub) or your `.jsonl`
(`question`/`answer`, optional `level`). Answers are checked with math-verify; R1-style replies are graded on what
follows `</think>`, and their length is split into thinking and answer tokens. Greedy by default; sample (seeded)
for R1-distilled models. Every evaluation adds points to the scatter: the accuracy-vs-length frontier.
"""

EXPORT = """
Download the merged model (safetensors + model card, zipped), the recipe (JSON, and a mergekit-style YAML of the
coefficients) and the charts, all on one self-contained HTML page that opens offline. To publish the model, paste
a Hugging Face **write token**; it is used for this upload only and never logged or stored.
"""

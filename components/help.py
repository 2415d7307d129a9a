"""Short explanations shown in the app (kept here so the panels stay readable)."""

INTRO = """
# ACM Merge Explorer
**Activation-Guided Consensus Merging** ([arXiv 2505.14009](https://arxiv.org/abs/2505.14009)) merges a base LLM
with fine-tuned LLMs using a **coefficient per layer**, set from how much each fine-tuned layer's activations
still share with the base's. Forward passes only, no gradients. The bundled miniature models are preselected:
walk through the tabs left to right — **Analyse → Merge → Chat → Evaluate** — no configuration needed.
"""

HOW_TO_READ = """
**How to read the charts.** *NMI* (normalised mutual information, 0…1) measures, layer by layer, how much of the
base model's activations can be predicted from the fine-tuned model's on the same calibration text: **high NMI**
means the layer barely changed (redundant with the base), **low NMI** means it learned something task-specific.
ACM turns NMI into per-layer merge coefficients **λₖ(t) = α·K·exp(−t·NMIₖ) / Σⱼ exp(−t·NMIⱼ)**: layers with lower
NMI get a larger λ, and the mean λ stays α. The **sharpness t** sets the contrast: **t = 0 is exactly the plain
method** (every layer gets α, the dashed line), larger t spreads the coefficients further apart. In the
evaluation scatter, points further **up and to the left** are better: more accurate with shorter answers
(the paper's Long-to-Short picture).
"""

MODELS = """
Pick the **base** model and 1–3 **fine-tuned** descendants of it: a bundled demo model, a local folder, or a Hub
id (`org/name`, needs internet). **Check** reads configs and safetensors headers only — no weights are loaded —
and says whether the models can be merged.
"""

TRUST_WARNING = ("⚠ **trust_remote_code runs Python code shipped with the model repository on this machine.** "
                 "Only enable it for repositories you trust.")

CALIBRATION = """
ACM compares the two models' activations on **calibration text**. The bundled set fits the demo models. With your
own file (`.jsonl`/`.json` with a text field, `.csv`, or `.txt` one sample per line) or a Hub dataset, the texts
are clustered and sampled evenly across clusters (the paper uses ~10% of s1K).
"""

ANALYSIS = """
**Analyse** runs both models over the calibration samples and measures the per-layer NMI. It is cached: changing t
or α afterwards (or merging again) never re-runs it. Move **t** and **α** to see the coefficients change instantly.
"""

MERGE = """
Choose a method. **ACM** uses the per-layer λ from the analysis (at the t and α set in the Analyse tab);
**plain** uses α everywhere (the baseline). The merged model is kept loaded for the Chat and Evaluate tabs.
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

"""What did fine-tuning change? Added and removed SAE features, per image, per feature and per class.

SAE-FT (arXiv 2605.15961) makes fine-tuning readable as a list of SAE features that appeared or disappeared. This
package measures that list for any fine-tuned model (full checkpoint or LoRA adapter) against the pre-trained one, on
any labelled image dataset, and turns it into a JSON file and one self-contained HTML report.

The pieces, in the order data flows through them::

    z0, labels = embeddings of the pre-trained model         [N, d]   (compute_embeddings, eval transform)
    z          = embeddings of the fine-tuned model           [N, d]   (same images, same order)
    report     = compare_codes(sae, z0, z, labels)             FeatureChangeReport (pure function of embeddings)
    describe_with_text(report, sae, build_text_vocabulary(clip, tokenizer, classnames, templates))
    write_report({"FT": report_ft, "SAE-FT": report_saeft}, "report.html", dataset=raw_dataset)

`compute_feature_changes` does the first three steps for one model; `interpret_runs` does everything for one or more
fine-tuned models (the pre-trained embeddings are computed once) and writes JSON, grid PNGs and `report.html`.

Definitions (codes `s0 = SAE(z0)` and `s = SAE(z)`, both [N, F]; "active" means a non-zero code):

- ``added[i, j]   = (s[i, j] != 0) & (s0[i, j] == 0)``: feature j is active on image i after fine-tuning only.
- ``removed[i, j] = (s0[i, j] != 0) & (s[i, j] == 0)``: active before only.
- Per feature: ``added_count[j] = sum_i added[i, j]`` (images), ``added_mean_abs[j]`` = mean of ``|s[i, j]|`` over
  those images, and the same for removal with ``|s0[i, j]|``. Features are ranked by their *mass*, count times
  mean |activation| (= the summed |activation| that appeared or vanished), so a feature added often but weakly and
  one added rarely but strongly are both visible; ties go to the larger count.
- Per image: ``added_per_image = mean_i sum_j added[i, j]``. For TopK SAEs (exactly k active codes per image) the
  numbers added and removed per image are equal (every addition displaces a feature); the *distinct* features
  added and removed differ, and that is the interesting part.
- ``frequency_before[j]``: fraction of images where feature j is active in ``s0``; ``mean_activation_before[j]``:
  mean signed code over those images (0 if never active). Same for "after".
- FVU (fraction of variance unexplained) of the SAE's reconstruction of its inputs, ``sum ||x - x_hat||^2 /
  sum ||x - mean(x)||^2``, for the pre-trained inputs (how good the dictionary is) and for the fine-tuned inputs
  (how much of the new embedding the pre-trained dictionary can still express).
- Linear CKA between the raw pre-trained and fine-tuned embeddings (1 = same geometry up to rotation and scale).

Input regime (which vectors the SAE sees), chosen by ``normalize``:

- ``None`` (default): ``sae.preprocess(z)``, exactly how the SAE was trained (unit L2 norm for the paper's SAE),
  i.e. what ``sae(z)`` does. This is the regime in which the SAE's features mean what they were trained to mean, so it
  is the right one to *read* a change, whatever regime the penalty used during training.
- ``True``: ``z / |z|`` regardless of the SAE's config (the penalty's ``normalize=True``).
- ``False``: raw ``z``, as the reference penalty feeds the SAE (``sae_ft_penalty(normalize=False)``); useful to see
  exactly the codes the training penalty saw. FVU is then measured on raw vectors too.

Nothing here trains or changes a model. matplotlib (the summary charts only) is imported lazily; without it the
report is written without them. The feature pages' histograms and heatmaps are drawn with PIL.

The package keeps the analysis apart from the rendering: `analysis` (codes, statistics; no plotting, no HTML),
`text` (CLIP text prompts closest to a feature), `report` (images, charts, the HTML file) and `runs`
(`interpret_runs`, end to end). Everything public is re-exported here.

Feature pages (as saev and Neuronpedia show SAE features): `select_features` picks the features to show,
`profile_features` measures each under every model (frequency, mean and max activation, activation histogram on
shared bins, top-activating images), `describe_profiles` adds the closest prompts, and for SAEs on
`hidden_states.{i}.{cls|mean}` `patch_activations` maps a feature's encoder pre-activation over the patch tokens
(the report overlays it on the top images).
"""

from .analysis import (
    CHANGES_FILENAME,
    DIRECTIONS,
    PRETRAINED_NAME,
    PROFILES_FILENAME,
    RANK_BY,
    REPORT_FILENAME,
    ClassChange,
    FeatureChange,
    FeatureChangeReport,
    FeatureProfile,
    compare_codes,
    compute_feature_changes,
    fraction_of_variance_unexplained,
    linear_cka,
    load_model_for_interpretation,
    load_profiles,
    patch_activations,
    profile_features,
    sae_inputs,
    save_profiles,
    select_features,
)
from .report import (
    activation_histogram,
    captioned_strip,
    feature_grid,
    feature_image_strip,
    heatmap_overlay,
    plot_class_changes,
    plot_feature_counts,
    plot_feature_density,
    write_report,
)
from .runs import interpret_runs
from .text import TextVocabulary, build_text_vocabulary, describe_profiles, describe_with_text

__all__ = [
    "ClassChange",
    "FeatureChange",
    "FeatureChangeReport",
    "FeatureProfile",
    "TextVocabulary",
    "activation_histogram",
    "build_text_vocabulary",
    "captioned_strip",
    "compare_codes",
    "compute_feature_changes",
    "describe_profiles",
    "describe_with_text",
    "feature_grid",
    "feature_image_strip",
    "fraction_of_variance_unexplained",
    "heatmap_overlay",
    "interpret_runs",
    "linear_cka",
    "load_model_for_interpretation",
    "load_profiles",
    "patch_activations",
    "plot_class_changes",
    "plot_feature_counts",
    "plot_feature_density",
    "profile_features",
    "sae_inputs",
    "save_profiles",
    "select_features",
    "write_report",
]

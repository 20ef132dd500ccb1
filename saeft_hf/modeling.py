"""A CLIP image classifier for SAE-FT: vision tower + visual projection + a head that normalises its input.

`SAEFTCLIPForImageClassification.from_pretrained` loads our own checkpoints and any CLIP checkpoint (`CLIPModel`
weights such as `openai/clip-vit-base-patch16`, or a local directory): the attribute names `vision_model` and
`visual_projection` match CLIP's, so the vision weights load directly; the head is then filled with
`saeft_hf.zeroshot.build_zeroshot_head` (or `from_clip`, which does both).

The forward returns the logits and the representation(s) the SAE-FT penalty needs (the final image embedding by
default), never every hidden state. Several representations (`"hidden_states.-1.cls,hidden_states.-2.cls"`, one SAE
each) come from the same single forward, concatenated along the feature axis in the order given: one tensor keeps the
output, the cached `z0` column and every collective (DDP, FSDP, gathers) exactly as for one representation;
`split_representation` cuts it back into per-representation parts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, CLIPVisionConfig, CLIPVisionModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

_HIDDEN = re.compile(r"^hidden_states\.(-?\d+)\.(cls|mean)$")


def parse_representation(spec: str) -> tuple[str, int | None, str | None]:
    """Validate a representation spec: `image_embeds`, `pooler_output` or `hidden_states.{i}.{cls|mean}`.

    `hidden_states.{i}` follows transformers: 0 is the embedding output, i the output of block i (before the
    post-layernorm). Returns (kind, layer, pooling).
    """
    if spec in ("image_embeds", "pooler_output"):
        return spec, None, None
    match = _HIDDEN.match(spec)
    if match is None:
        raise ValueError(
            f"Unknown representation {spec!r}: use 'image_embeds' (final projected CLIP embedding, the paper's), "
            "'pooler_output' (post-layernorm CLS before the projection), or 'hidden_states.{layer}.cls' / "
            "'hidden_states.{layer}.mean'."
        )
    return "hidden_states", int(match.group(1)), match.group(2)


def parse_representations(spec: str | Sequence[str]) -> list[str]:
    """Several representation specs, comma-separated (`"hidden_states.-1.cls,hidden_states.-2.cls"`) or a list.

    Each is checked with `parse_representation`; surrounding spaces are dropped; a spec given twice is an error (its
    penalty would silently count twice). One spec gives a one-element list.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or not all(isinstance(s, str) for s in items):
        raise ValueError(f"representation must be a string or a list of strings, got {spec!r}.")
    specs = [s.strip() for s in items]
    if any(not s for s in specs):
        raise ValueError(f"representation {spec!r} has an empty entry: separate specs with single commas, e.g. "
                         "'hidden_states.-1.cls,hidden_states.-2.cls'.")
    for s in specs:
        parse_representation(s)
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise ValueError(f"representation {spec!r} names {repeated} more than once: each representation gets one SAE "
                         "and one penalty term; list it once.")
    return specs


def join_representations(spec: str | Sequence[str]) -> str:
    """The canonical string form (comma-separated, no spaces) of one or several specs, as stored in configs."""
    return ",".join(parse_representations(spec))


class SAEFTCLIPConfig(PreTrainedConfig):
    """Configuration of `SAEFTCLIPForImageClassification`.

    Args:
        vision_config: a `CLIPVisionConfig` (or dict). Loading a CLIP checkpoint's config fills it from CLIP's.
        projection_dim: width of the visual projection (CLIP's `projection_dim`); defaults to the vision config's.
        representation: what the model returns for the SAE-FT penalty (see `parse_representation`); several specs,
            comma-separated or as a list, are returned concatenated (see `parse_representations`).
        source_model: the pre-trained checkpoint this classifier started from (checked against the SAE's).
        num_labels / id2label / label2id: the classes of the head (standard `PreTrainedConfig` arguments).
    """

    model_type = "saeft_clip"
    sub_configs = {"vision_config": CLIPVisionConfig}
    keys_to_ignore_at_inference = ["representation", "hidden_states", "attentions"]

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict | None = None,
        projection_dim: int | None = None,
        representation: str | Sequence[str] = "image_embeds",
        source_model: str | None = None,
        text_config: dict | None = None,  # accepted (and dropped) so CLIP checkpoints' configs load
        logit_scale_init_value: float | None = None,
        **kwargs,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        if projection_dim is not None:
            # CLIPConfig keeps projection_dim at the top level; the vision sub-config's default (512) may disagree.
            self.vision_config.projection_dim = projection_dim
        self.projection_dim = self.vision_config.projection_dim
        self.representation = join_representations(representation)
        self.source_model = source_model
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


@dataclass
class SAEFTClassifierOutput(ModelOutput):
    """Output of `SAEFTCLIPForImageClassification`.

    Attributes:
        loss: cross-entropy when `labels` are given.
        logits: [B, num_labels].
        representation: [B, d] the vector the SAE-FT penalty is computed on (raw, not normalised); with several
            representations, their concatenation [B, d_1 + d_2 + ...] in the config's order.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    representation: torch.Tensor | None = None


class SAEFTCLIPForImageClassification(PreTrainedModel):
    """CLIP vision tower + visual projection + a classification head on the L2-normalised image embedding."""

    config_class = SAEFTCLIPConfig
    base_model_prefix = "saeft_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # The loss is a per-batch mean: the Trainer must not inject num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: SAEFTCLIPConfig) -> None:
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = CLIPVisionModel._from_config(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "classifier", None):
            # A placeholder until the zero-shot / linear-probe head is written in; zeros give uniform logits.
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def representation_specs(self) -> list[str]:
        """The representation specs the penalty sees, in order (one, or several from a comma-separated config)."""
        return parse_representations(self.config.representation)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (representation(s) for the penalty [B, d], projected image embedding [B, projection_dim]).

        One vision forward, with `output_hidden_states` only when a spec reads a hidden state; several specs are
        concatenated in order.
        """
        parsed = [parse_representation(s) for s in self.representation_specs()]
        need_hidden = any(kind == "hidden_states" for kind, _, _ in parsed)
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=need_hidden)
        image_embeds = self.visual_projection(out.pooler_output)
        reps = []
        for kind, layer, pooling in parsed:
            if kind == "image_embeds":
                reps.append(image_embeds)
            elif kind == "pooler_output":
                reps.append(out.pooler_output)
            else:
                hidden = out.hidden_states[layer]
                reps.append(hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1))
        return (reps[0] if len(reps) == 1 else torch.cat(reps, dim=-1)), image_embeds

    def get_representation(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Only the penalty's representation(s) [B, d] (used for the frozen reference forward)."""
        return self.encode_image(pixel_values)[0]

    def representation_dims(self) -> list[int]:
        """The width of each representation, in `representation_specs` order."""
        return [self.config.projection_dim if parse_representation(s)[0] == "image_embeds"
                else self.config.vision_config.hidden_size for s in self.representation_specs()]

    def representation_dim(self) -> int:
        """Width of what `get_representation` returns (the sum of the widths with several representations)."""
        return sum(self.representation_dims())

    def split_representation(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a (concatenated) representation [..., d] into `{spec: [..., d_spec]}`, in order."""
        dims = self.representation_dims()
        if z.shape[-1] != sum(dims):
            raise ValueError(f"A representation of width {z.shape[-1]} cannot be split into "
                             f"{self.config.representation} "
                             f"(widths {dims}, {sum(dims)} in all).")
        return dict(zip(self.representation_specs(), torch.split(z, dims, dim=-1)))

    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> SAEFTClassifierOutput:
        if pixel_values is None:
            raise ValueError("SAEFTCLIPForImageClassification needs `pixel_values` [B, C, H, W].")
        representation, image_embeds = self.encode_image(pixel_values)
        logits = self.classifier(F.normalize(image_embeds, dim=-1))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SAEFTClassifierOutput(loss=loss, logits=logits, representation=representation)


AutoConfig.register("saeft_clip", SAEFTCLIPConfig)
AutoModelForImageClassification.register(SAEFTCLIPConfig, SAEFTCLIPForImageClassification)

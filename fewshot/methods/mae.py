"""MAE: masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners",
https://arxiv.org/abs/2111.06377), following the authors' models_mae.py on a timm ViT.

Each image (RandomResizedCrop of scale 0.2–1, horizontal flip) is cut into L patches. Per image, a random
``mask_ratio`` of them is dropped (argsort of uniform noise; exactly ``int(L · (1 - ratio))`` are kept), and the
timm encoder (its own patch_embed, class token, position embeddings, blocks and final norm) sees only the
visible patches plus its prefix tokens. A light decoder (ours: a linear map to ``decoder_dim``, a learned mask
token, FIXED 2-D sin-cos position embeddings, timm ``Block``s, a linear map to p²·3 pixels) restores the full
sequence and predicts every patch; the loss is the MSE on the masked patches only, against targets normalised per
patch (``norm_pix_loss``: mean 0, variance 1 with eps 1e-6, as the paper's code). As in the paper's code the
encoder's position embeddings are fixed sin-cos too (``fixed_pos_embed``) and every linear layer is
Xavier-uniform initialised. The exported backbone is the encoder alone, a plain timm model. The method, its
decoder, masking, loss and reconstructions stay in one module past 300 lines, as models_mae.py keeps them.

Frozen features are MAE's weak point: it is built to be fine-tuned, and its CLS token in particular is a poor
frozen descriptor (lightly's ImageNet benchmark: MAE ViT-B/16 11.2% k-NN top-1 vs DINO ViT-S/16 67.5%). For MAE
backbones use ``avg`` pooling (mean of the patch tokens) and the ``linear`` head (BatchNorm + linear layer, MAE's
own linear probe) rather than k-NN on the CLS token.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fewshot.augment import CROP_DRAWS, crop_boxes, full_sizes, resized_crops
from fewshot.errors import FewshotError
from fewshot.methods.base import Method, RunPlan, create_vit, load_init, prepare

if TYPE_CHECKING:
    from fewshot.image_store import ImageStore
    from fewshot.inits import InitWeights
    from fewshot.pretrain_config import PretrainConfig

NORM_EPS = 1e-6  # MAE's per-patch normalisation: (x - mean) / sqrt(var + 1e-6)


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p·p·C)``: patches in row-major order, pixels as (row, column, channel)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)  # MAE's layout
    return x.reshape(b, gh * gw, patch * patch * c)  # (B, L, p²C)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p·p·C)`` -> ``(B, C, gh·p, gw·p)``."""
    b, gh, gw = patches.shape[0], grid[0], grid[1]
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * patch, gw * patch)  # (B, C, H, W)


def random_masking(
    batch: int, length: int, ratio: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: ``ids_keep (B, K)``, ``ids_restore (B, L)``, ``mask (B, L)`` (1 = masked).

    Patches are shuffled by the argsort of uniform noise and the first ``K = int(L · (1 - ratio))`` kept;
    ``ids_restore`` undoes the shuffle.
    """
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, generator=generator, device=device)  # (B, L)
    ids_shuffle = noise.argsort(1)  # ascending: small noise is kept
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, mask.gather(1, ids_restore)  # mask in the original patch order


def pixel_targets(images: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """The reconstruction targets ``(B, L, p²·3)``: patch pixels, normalised per patch when ``norm_pix``."""
    target = patchify(images, patch)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)  # unbiased, as the paper's code
        target = (target - mean) / (var + NORM_EPS) ** 0.5
    return target


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over the masked patches only (``mask`` 1 = masked)."""
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def sincos_2d(dim: int, grid: tuple[int, int], prefix: int = 0) -> Tensor:
    """MAE's ``get_2d_sincos_pos_embed``: ``(prefix + gh·gw, dim)``, zero rows for the prefix tokens; the first
    half of each row encodes the column, the second the row, each as [sin | cos] over ``dim / 4`` frequencies."""
    if dim % 4:
        raise FewshotError(f"sin-cos position embeddings need a width divisible by 4, got {dim}; change the width")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (L, dim/4)
        return torch.cat([out.sin(), out.cos()], 1)  # (L, dim/2)

    table = torch.cat([embed(cols), embed(rows)], 1)  # (L, dim)
    return torch.cat([torch.zeros(prefix, dim, dtype=torch.float64), table]).float()


def _init_mae(module: nn.Module) -> None:
    """MAE's ``_init_weights``: Xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Decoder(nn.Module):
    """MAE's light decoder: embed, add mask tokens, unshuffle, fixed sin-cos positions, blocks, norm, predict."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch: int, grid: tuple[int, int],
        prefix: int,
    ) -> None:  # fmt: skip
        from timm.layers import LayerNorm  # eps 1e-6, as MAE's decoder
        from timm.models.vision_transformer import Block

        super().__init__()
        self.prefix = prefix
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed: Tensor
        self.register_buffer("pos_embed", sincos_2d(dim, grid, prefix)[None], persistent=False)  # fixed
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)]
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_mae)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)  # (B, P + K, Dd)
        prefix, visible = x[:, : self.prefix], x[:, self.prefix :]
        b, k, d = visible.shape
        n = ids_restore.shape[1]
        masks = self.mask_token.to(visible.dtype).expand(b, n - k, d)
        tokens = torch.cat([visible, masks], 1)  # (B, L, Dd) in shuffled order
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, d))  # back to the patch order
        x = torch.cat([prefix, tokens], 1) + self.pos_embed  # (B, P + L, Dd)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.prefix :])  # (B, L, p²·3)


def crop_flip(
    images: Tensor, size: int, scale: tuple[float, ...], flip_prob: float, mean: tuple[float, ...],
    std: tuple[float, ...], generator: torch.Generator, rows: slice = slice(None), total: int | None = None,
    sizes: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """MAE's augmentation on a ``(B, 3, S, S)`` uint8 batch of canvases (``sizes (B, 2)``: each image's height and
    width in its canvas, default the whole canvas): RandomResizedCrop(``scale``) of the image to ``size``,
    horizontal flip, normalisation; one view per image (boxes from :func:`fewshot.augment.crop_boxes`). The images
    are the rows ``rows`` of a batch of ``total`` (torchrun): the random numbers are drawn for all ``total``."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, S, S) uint8 batch, got {tuple(images.shape)} {images.dtype}")
    b = images.shape[0]
    total = total or b
    dev = images.device
    sizes = full_sizes(images) if sizes is None else sizes
    boxes = crop_boxes(sizes, scale, torch.rand(total, CROP_DRAWS, generator=generator, device=dev)[rows])  # (B, 4)
    flip = torch.rand(total, generator=generator, device=dev)[rows] < flip_prob
    x = resized_crops(images.float(), boxes.view(1, b, 4), flip.view(1, b), size, sizes)  # (B, 3, size, size)
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return (x / 255 - m) / s  # (B, 3, size, size) float32, normalised


class MAE(Method):
    """timm ViT encoder on the visible patches + light decoder; reconstructs the masked patches' pixels."""

    feature_pool = "avg"  # MAE's class token is a weak frozen feature (see the module docstring)

    def __init__(self, cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        m = self.mae_cfg = cfg.mae
        self.plan = plan
        arch, img_size, mean, std = cfg.resolved_input()
        encoder, self.model_kwargs = create_vit(cfg, drop_path_rate=m.drop_path_rate, init=init)
        if not isinstance(encoder, VisionTransformer):
            raise FewshotError(f"MAE needs a plain timm ViT (e.g. vit_base_patch16_224), not '{arch}'")
        self.architecture = arch
        self.encoder = encoder
        self.patch = int(encoder.patch_embed.patch_size[0])
        if img_size % self.patch:
            raise FewshotError(f"--img-size {img_size} is not a multiple of the patch size {self.patch}")
        self.grid = (img_size // self.patch, img_size // self.patch)
        self.n_patches = self.grid[0] * self.grid[1]
        self.n_keep = int(self.n_patches * (1 - m.mask_ratio))
        if self.n_keep < 1:
            raise FewshotError(
                f"mae.mask_ratio {m.mask_ratio} keeps no patch of {self.n_patches}; lower it or raise --img-size"
            )
        self.prefix = int(encoder.num_prefix_tokens)
        self.init_report = load_init(encoder, init) if init is not None else ""
        if init is None:
            self._init_encoder(m.fixed_pos_embed)
        if m.fixed_pos_embed and encoder.pos_embed is not None:
            encoder.pos_embed.requires_grad_(False)
        dim = int(encoder.embed_dim)
        self.decoder = Decoder(dim, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.decoder_mlp_ratio, self.patch,
                               self.grid, self.prefix)  # fmt: skip
        self.img_size, self.mean, self.std, self.seed = img_size, tuple(mean), tuple(std), cfg.seed

    def _init_encoder(self, sincos: bool) -> None:
        """MAE's initialize_weights on the timm encoder (its own init differs: truncated normal linears)."""
        vit: Any = self.encoder
        vit.apply(_init_mae)
        w = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # like a linear layer
        for token in (vit.cls_token, vit.reg_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        if sincos and vit.pos_embed is not None:
            rows = vit.pos_embed.shape[1] - self.n_patches  # prefix rows (0 with no_embed_class)
            vit.pos_embed.data.copy_(sincos_2d(vit.pos_embed.shape[-1], self.grid, rows)[None])

    @classmethod
    def build(cls, cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None = None) -> MAE:
        cfg, init = prepare(cfg, init)
        return cls(cfg, plan, init)

    def backbone_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def augment(
        self, images: Tensor, generator: torch.Generator, rows: slice = slice(None), batch: int | None = None,
        sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        m, total = self.mae_cfg, batch or images.shape[0]
        x = crop_flip(images, self.img_size, m.crop_scale, m.flip_prob, self.mean, self.std, generator, rows, total,
                      sizes)  # fmt: skip
        masking = random_masking(total, self.n_patches, m.mask_ratio, generator, x.device)
        ids_keep, ids_restore, mask = (t[rows] for t in masking)  # this process's rows of the global batch
        return {"images": x, "ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask}

    def encode(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """The encoder on the visible patches ``ids_keep (B, K)`` only: ``(B, P + K, D)`` after its final norm."""
        vit: Any = self.encoder
        x = vit.patch_embed(images)  # (B, gh, gw, D) with dynamic_img_size, else (B, L, D)
        x = vit._pos_embed(x)  # (B, P + L, D): prefix tokens, position embeddings added
        d = x.shape[-1]
        visible = x[:, self.prefix :].gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, K, D)
        x = vit.norm_pre(torch.cat([x[:, : self.prefix], visible], 1))  # (B, P + K, D)
        return vit.norm(vit.blocks(x))

    def predict(self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        """Predicted pixels of every patch, ``(B, L, p²·3)`` (normalised per patch when norm_pix_loss)."""
        return self.decoder(self.encode(images, ids_keep), ids_restore)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        images, mask = batch["images"], batch["mask"]  # (B, 3, S, S), (B, L)
        pred = self.predict(images, batch["ids_keep"], batch["ids_restore"]).float()
        target = pixel_targets(images.float(), self.patch, self.mae_cfg.norm_pix_loss)  # (B, L, p²·3)
        loss = masked_mse(pred, target, mask)
        with torch.no_grad():
            # the loss of predicting each masked patch's own mean colour: what a model that learnt nothing
            # about structure reaches (≈ 1 with norm_pix_loss)
            baseline = masked_mse(target.mean(-1, keepdim=True).expand_as(target), target, mask)
        return {"loss": loss, "baseline_loss": baseline}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(original, masked, reconstruction) of ``(n, 3, img_size, img_size)`` uint8 images, floats in 0..1.

        Masked patches are mid-grey in ``masked``; ``reconstruction`` shows the visible patches as they are and the
        predicted ones in their place. With norm_pix_loss the model predicts only each patch's normalised
        pattern, so its true mean and variance are borrowed to display it (as the paper's visualisations do).
        """
        was_training = self.training
        self.eval()
        dev = images.device
        original = images.float() / 255  # (n, 3, S, S)
        m = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        x = (original - m) / s
        ids_keep, ids_restore, mask = random_masking(x.shape[0], self.n_patches, self.mae_cfg.mask_ratio,
                                                     generator, dev)  # fmt: skip
        pred = self.predict(x, ids_keep, ids_restore).float()  # (n, L, p²·3)
        target = patchify(x, self.patch)
        if self.mae_cfg.norm_pix_loss:
            pred = pred * (target.var(-1, keepdim=True) + NORM_EPS) ** 0.5 + target.mean(-1, keepdim=True)
        hidden = unpatchify(mask[..., None].expand_as(target), self.patch, self.grid)  # (n, 3, S, S), 1 = masked
        recon = unpatchify(pred, self.patch, self.grid) * s + m
        self.train(was_training)
        masked = torch.where(hidden > 0, 0.5, original)
        reconstruction = torch.where(hidden > 0, recon.clamp(0, 1), original)
        return original, masked, reconstruction

    def on_epoch_end(self, epoch: int, run_dir: Path, images: ImageStore, final: bool) -> None:
        """Every ``mae.reconstruct_every`` epochs and at the end: RUN/reconstructions/epoch_NNNN.png."""
        from fewshot.reconstructions import write_reconstructions

        every, n = self.mae_cfg.reconstruct_every, self.mae_cfg.reconstruct_images
        if n > 0 and (final or (every > 0 and (epoch + 1) % every == 0)):
            path = Path(run_dir) / "reconstructions" / f"epoch_{epoch + 1:04d}.png"
            write_reconstructions(self, images, path, n, seed=self.seed)

    def export_backbone(self) -> nn.Module:
        return self.encoder

    def resolved(self) -> dict[str, Any]:
        return {
            "patches": self.n_patches,
            "visible_patches": self.n_keep,
            "encoder_pos_embed": "sincos-2d (fixed)" if self.mae_cfg.fixed_pos_embed else "learned",
        }

    def diagnose(self, logs: dict[str, float]) -> list[str]:
        if logs.get("step", 0) < 0.25 * self.plan.total_steps:
            return []  # too early to tell
        loss, base = logs.get("loss", 0.0), logs.get("baseline_loss", 0.0)
        if base > 0 and loss > 0.95 * base:
            return [
                f"MAE reconstructs little beyond each patch's mean colour (loss {loss:.3f} vs {base:.3f} for the "
                "mean); raise optim.lr or train longer, and check the images are not noise or near-constant"
            ]
        return []

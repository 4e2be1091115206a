"""Vision Transformers for 112x112 faces (``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``).

The layout is arcface_torch's ``vit.py``: a 9x9 patch embedding with stride 9 (12x12 = 144 tokens, no class
token), learned position embeddings, pre-norm blocks (LayerNorm, multi-head attention with a bias-free qkv
projection, LayerNorm, ReLU6 MLP of ratio 4) with stochastic depth, a final LayerNorm, and a head that
flattens all 144 tokens: Linear(144*dim -> dim, no bias), BatchNorm1d, Linear(dim -> D, no bias),
BatchNorm1d (both eps 2e-5). During training a fraction ``mask_ratio`` of the tokens is dropped before the
blocks and replaced by the learned ``mask_token`` after the final norm. Names follow arcface_torch, so its
ViT state dicts load here.

Variants (all 8 heads, patch 9):

========  =====  =====  ===============  ==========
name      dim    depth  drop_path_rate   mask_ratio
========  =====  =====  ===============  ==========
vit_t     256    12     0.1              0.1
vit_s     512    12     0.1              0.1
vit_b     512    24     0.1              0.1
vit_l     768    24     0.05             0.05
========  =====  =====  ===============  ==========

plus arcface_torch's WebFace42M names ``vit_t_dp005_mask0``, ``vit_s_dp005_mask_0``,
``vit_b_dp005_mask_005`` and ``vit_l_dp005_mask_005``.
"""
import torch
from torch import nn

from .iresnet import autocast_off, body_autocast, resolve_amp_dtype, run_stage
from .registry import register_backbone


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (scaled by 1/(1-p))."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(q k^T) v part always runs in float32."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        n, d = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        with autocast_off(x.device.type):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = (attn @ v).transpose(1, 2).reshape(-1, n, d)
        return self.proj_drop(self.proj(out))

    def matmul_macs(self, batch, tokens):
        """Multiply-adds of q k^T and attn v (which module hooks do not see)."""
        return 2 * batch * self.num_heads * tokens * tokens * self.head_dim


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size=112, patch_size=9, in_channels=3, embed_dim=768):
        super().__init__()
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.grid = self.img_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[2:] != (self.img_size, self.img_size)):
            raise ValueError(f"expected images [N, C, {self.img_size}, {self.img_size}], got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, num_features=512, img_size=112, patch_size=9, in_channels=3, embed_dim=768, depth=12,
                 num_heads=8, mlp_ratio=4.0, qkv_bias=False, dropout=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, mask_ratio=0.1, fp16=False, checkpointing=False, amp_dtype=None):
        super().__init__()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_features = int(num_features)
        self.embed_dim = int(embed_dim)
        self.mask_ratio = float(mask_ratio)
        self.fp16 = bool(fp16)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)
        self.checkpointing = bool(checkpointing)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_channels, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop=dropout, attn_drop=attn_drop_rate,
                  drop_path=rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, self.num_features, bias=False),
            nn.BatchNorm1d(self.num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"pos_embed"}

    def _random_masking(self, x):
        """Keep a random ``1 - mask_ratio`` of each sample's tokens; also return the restoring permutation."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, dim))
        return kept, restore

    def forward_features(self, x):
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._random_masking(x)
        for block in self.blocks:
            x = run_stage(block, x, self.checkpointing and self.training)
        x = self.norm(x.float())
        if masking:
            fill = self.mask_token.expand(batch, restore.shape[1] - x.shape[1], -1).to(x.dtype)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        return x.flatten(1)

    def forward(self, x):
        with body_autocast(self.fp16, x.device.type, self.amp_dtype):
            x = self.forward_features(x)
        with autocast_off(x.device.type):  # the embedding head always runs in float32
            return self.feature(x.float())


VIT_VARIANTS = {
    # name: (embed_dim, depth, num_heads, drop_path_rate, mask_ratio)
    "vit_t": (256, 12, 8, 0.1, 0.1),
    "vit_s": (512, 12, 8, 0.1, 0.1),
    "vit_b": (512, 24, 8, 0.1, 0.1),
    "vit_l": (768, 24, 8, 0.05, 0.05),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05),
    "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.05),
}


def _factory(name):
    dim, depth, heads, drop_path, mask = VIT_VARIANTS[name]

    def build(num_features=512, dropout=0.0, fp16=False, checkpointing=False, **kwargs):
        kwargs.setdefault("drop_path_rate", drop_path)
        kwargs.setdefault("mask_ratio", mask)
        return VisionTransformer(num_features=num_features, img_size=112, patch_size=9, embed_dim=dim,
                                 depth=depth, num_heads=heads, dropout=dropout, fp16=fp16,
                                 checkpointing=checkpointing, **kwargs)

    build.__name__ = name
    build.__doc__ = (f"ViT {name}: dim {dim}, depth {depth}, {heads} heads, patch 9; extra kwargs: "
                     "drop_path_rate, mask_ratio, attn_drop_rate, qkv_bias, amp_dtype.")
    return register_backbone(name)(build)


for _name in VIT_VARIANTS:
    _factory(_name)

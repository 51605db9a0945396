"""ConditionalRoutedViT: a simple ViT (Beyer et al. 2022: patch embedding, 2D sin-cos positions,
mean pooling) whose layers are CoLT5 routed image attention and routed feed-forward.

Axes: b batch, c channels, y/x patch grid rows/columns, p/q pixels inside a patch, d model dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .colt5 import ConditionalRoutedFeedForward, ConditionalRoutedImageAttention


def pair(t) -> tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


def posemb_sincos_2d(patches: Tensor, temperature: float = 10000.) -> Tensor:
    """Fixed 2D sin-cos positions for a (b, y, x, d) patch grid -> (y, x, d)."""
    _, h, w, dim = patches.shape
    if dim % 4 != 0:
        raise ValueError(f'the 2D sin-cos embedding needs dim divisible by 4, got {dim}')
    y, x = torch.meshgrid(torch.arange(h, device=patches.device), torch.arange(w, device=patches.device),
                          indexing='ij')
    omega = torch.arange(dim // 4, device=patches.device) / max(dim // 4 - 1, 1)
    omega = 1. / (temperature ** omega)
    y, x = y.flatten()[:, None] * omega[None], x.flatten()[:, None] * omega[None]
    pe = torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(patches.dtype)
    return rearrange(pe, '(y x) d -> y x d', y=h)


class ConditionalRoutedViT(nn.Module):
    """Images (b, channels, H, W) -> class logits (b, num_classes). Each of `depth` layers is
    x + ConditionalRoutedImageAttention(x) then + ConditionalRoutedFeedForward(.) over all patches.
    Coordinate descent uses eps = `default_coor_descent_eps` unless router_kwargs say otherwise."""

    def __init__(self, *, image_size, patch_size, num_classes: int, dim: int, depth: int,
                 attn_num_heavy_tokens_q: int, attn_num_heavy_tokens_kv: int, attn_heavy_dim_head: int,
                 attn_heavy_heads: int, attn_light_dim_head: int, attn_light_heads: int,
                 attn_light_window_size: int, ff_num_heavy_tokens: int, ff_heavy_mult: float, ff_light_mult: float,
                 channels: int = 3, router_straight_through: bool = True, router_kwargs: dict = {},
                 router_use_triton: bool = False, flash_attn: bool = True, attn_num_routed_kv: int = 1,
                 default_coor_descent_eps: float = 1., backend: str | None = None):
        super().__init__()
        image_h, image_w = pair(image_size)
        patch_h, patch_w = pair(patch_size)
        if image_h % patch_h or image_w % patch_w:
            raise ValueError(f'image size {(image_h, image_w)} must be divisible by the patch size '
                             f'{(patch_h, patch_w)}')
        self.image_size, self.patch_size = (image_h, image_w), (patch_h, patch_w)
        patch_dim = channels * patch_h * patch_w
        self.patch_norm_in, self.patch_proj = nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim)
        self.patch_norm_out = nn.LayerNorm(dim)

        # the seed's guess: images are closer to speech (eps 1) than to text (eps 0.02-0.03)
        router_kwargs = {'eps': default_coor_descent_eps, **router_kwargs}
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = ConditionalRoutedImageAttention(
                dim, num_heavy_tokens_q=attn_num_heavy_tokens_q, num_heavy_tokens_kv=attn_num_heavy_tokens_kv,
                num_routed_kv=attn_num_routed_kv, light_dim_head=attn_light_dim_head, light_heads=attn_light_heads,
                light_window_size=attn_light_window_size, heavy_dim_head=attn_heavy_dim_head,
                heavy_heads=attn_heavy_heads, router_straight_through=router_straight_through,
                router_kwargs=router_kwargs, use_triton=router_use_triton, use_flash_attn=flash_attn,
                backend=backend)
            ff = ConditionalRoutedFeedForward(
                dim, num_heavy_tokens=ff_num_heavy_tokens, light_ff_mult=ff_light_mult, heavy_ff_mult=ff_heavy_mult,
                router_straight_through=router_straight_through, router_kwargs=router_kwargs,
                use_triton=router_use_triton)
            self.layers.append(nn.ModuleList([attn, ff]))
        self.head_norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, img: Tensor) -> Tensor:
        if img.ndim != 4 or tuple(img.shape[-2:]) != self.image_size:
            raise ValueError(f'expected images (batch, channels, {self.image_size[0]}, {self.image_size[1]}), '
                             f'got shape {tuple(img.shape)}')
        p, q = self.patch_size
        x = rearrange(img, 'b c (y p) (x q) -> b y x (p q c)', p=p, q=q)
        x = self.patch_norm_out(self.patch_proj(self.patch_norm_in(x)))
        x = x + posemb_sincos_2d(x)
        for attn, ff in self.layers:
            x = attn(x) + x
            h = x.shape[1]
            flat = rearrange(x, 'b y x d -> b (y x) d')
            x = rearrange(ff(flat) + flat, 'b (y x) d -> b y x d', y=h)
        return self.head(self.head_norm(x.mean(dim=(1, 2))))

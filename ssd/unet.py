"""The ADM ("guided-diffusion") style Flexi-UNet of docs/method.md §7.

One set of weights, several *routes*. An input of size ``r`` enters at the UNet level ``l``
whose native size is the smallest at or above ``r`` (``cfg.level_of(r)``; ``r`` itself on a 2x
ladder, e.g. 24 px runs the 32-px blocks at 24 px on a gradual one, docs/method.md §10):

- ``keep_{r}``: shared ``conv_in`` at size ``r`` -> 1x1 entry adapter (``l > 0``) -> encoder
  levels ``l..L-1`` -> middle -> decoder levels ``L-1..l`` with real skips (without level
  ``l``'s upsample) -> 1x1 exit adapter (``l > 0``) -> shared output head. Output at ``r``.
- ``up_{r}_{s}``: the same, but the decoder also runs level ``l``'s upsample and the blocks of
  the output size's level (``cfg.level_of(s)``, and of any level between), fed zero tensors
  where the never-run encoder's skips would be. Output at ``s``: the last upsample is the
  nearest x2 where ``s`` is the double, a bilinear resize to ``s`` otherwise. Into full size,
  ``cfg.top_transition == "interp"`` replaces this with a bilinear resize of the input to
  ``s`` followed by ``keep_{s}`` (what the authors' code does); so does an up route whose two
  sizes share a level (24 -> 32), where there is no upsample to run.

``cfg.route_style == "authors"`` reproduces the authors' FlexiUNet for their released
checkpoints (``ssd.authors``): the output level runs one decoder block fewer, an up route
feeds a zero skip to its entry level's last block, and adapters exist only where the
channel count changes (:meth:`RouteModule._decoder_plan`).

Every route is a :class:`RouteModule` that holds references to exactly the submodules it
uses (parameter objects shared with the parent), under the same state-dict keys as in the
parent; :meth:`FlexiUNet.forward` runs the same ``RouteModule`` code. Routes have no
data-dependent control flow, so ``torch.jit.trace`` / ``torch.onnx.export`` work per route.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssd_core.config import ModelConfig, SSDConfig
from ssd_core.method import parse_route, route_name

# --------------------------------------------------------------------------- route names

def route_names(ssd_config: SSDConfig) -> list[str]:
    """The ``2n-1`` routes of a model whose ladder has ``n`` sizes, smallest first, interleaved:
    ``keep_8, up_8_16, keep_16, up_16_32, keep_32`` (``keep_8, up_8_14, keep_14, ...`` gradual)."""
    ladder = ssd_config.ladder
    names = []
    for i, size in enumerate(ladder):
        names.append(route_name(size, size))
        if i + 1 < len(ladder):
            names.append(route_name(size, ladder[i + 1]))
    return names


# --------------------------------------------------------------------------- layers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM sinusoidal embedding: ``t`` [N] (float) -> [N, dim] = [cos(t w), sin(t w)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def as_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as float32 [N]: accepts a Python number, a 0-d or an [N] int/float tensor."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=x.device)
    t = t.to(device=x.device, dtype=torch.float32)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM's zero-initialised last convs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm: x [N,C,H,W], emb [N,E] -> [N,C_out,H,W]."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int,
                 dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """ADM self-attention (legacy head order), plain matmul + float32 softmax.

    x [N,C,H,W] -> [N,C,H,W]; ``num_heads`` heads of C/num_heads channels over H*W tokens.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.channels, self.num_heads = channels, num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        head_ch = self.channels // self.num_heads  # static, so traces hold no Python math
        flat = x.reshape(n, c, height * width)
        qkv = self.qkv(self.norm(flat)).reshape(n * self.num_heads, 3 * head_ch, -1)
        q, k, v = qkv.split(head_ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(head_ch))
        weight = torch.matmul((q * scale).transpose(1, 2), k * scale)  # [N*heads, T, T], T=HW
        weight = torch.softmax(weight.float(), dim=-1).to(q.dtype)
        attn = torch.matmul(v, weight.transpose(1, 2))  # [N*heads, ch, T]
        out = flat + self.proj_out(attn.reshape(n, c, -1))
        return out.reshape(n, c, height, width)


class LevelBlock(nn.Module):
    """One ADM block: a ResBlock, then self-attention at attention resolutions."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class MiddleBlock(nn.Module):
    """Res -> Attn -> Res at the deepest level."""

    def __init__(self, channels: int, emb_channels: int, cfg: ModelConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_channels, cfg.norm_groups, cfg.dropout)
        self.attn = AttentionBlock(channels, cfg.num_heads, cfg.norm_groups)
        self.res2 = ResBlock(channels, channels, emb_channels, cfg.norm_groups, cfg.dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [N,C,H,W] -> [N,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [N,C,H,W] -> [N,C,2H,2W]; with ``size``, a bilinear resize to
    ``size`` x ``size`` instead of the x2 (the last upsample of a gradual ladder's up route)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(resize(x, size))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``x`` [N,C,h,w] to [N,C,size,size] (half-pixel centres; the exact x2
    keeps the scale-factor form every exported 2x graph has)."""
    if size == 2 * x.shape[-1]:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- the network


class FlexiUNet(nn.Module):
    """ADM UNet with per-resolution entry/exit adapters (docs/method.md §7).

    Attributes mirror ADM's layout: ``conv_in``; ``enc[l]`` (``num_res_blocks`` blocks) and
    ``down[str(l)]``; ``middle``; ``dec[l]`` (``num_res_blocks + 1`` blocks, each consuming
    one skip) and ``up[str(l)]``; ``head``. ``entry[str(l)]``: ``C0 -> C_{l-1}`` and
    ``exit[str(l)]``: ``C_l -> C0`` (1x1 convs) for ``l >= 1``, with ``C_l = base*mult[l]``
    (with ``route_style="authors"`` only those that change the channel count).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        levels, emb_ch = cfg.num_levels, 4 * cfg.base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        every = cfg.route_style == "full"  # "authors": adapters only where channels change
        self.entry = nn.ModuleDict(
            {str(l): nn.Conv2d(chans[0], chans[l - 1], 1) for l in range(1, levels)
             if every or chans[l - 1] != chans[0]}
        )
        self.enc, self.down = self._build_encoder(chans, emb_ch)
        self.middle = MiddleBlock(chans[-1], emb_ch, cfg)
        self.dec, self.up = self._build_decoder(chans, emb_ch)
        self.exit = nn.ModuleDict(
            {str(l): nn.Conv2d(chans[l], chans[0], 1) for l in range(1, levels)
             if every or chans[l] != chans[0]}
        )
        self.head = nn.Sequential(
            GroupNorm32(cfg.norm_groups, chans[0]), nn.SiLU(),
            zero_module(nn.Conv2d(chans[0], cfg.in_channels, 3, padding=1)),
        )
        self._routes: dict[str, RouteModule] = {}  # plain dict: not registered submodules

    def _block(self, ch_in: int, ch_out: int, emb_ch: int, level: int) -> LevelBlock:
        cfg = self.cfg
        res = ResBlock(ch_in, ch_out, emb_ch, cfg.norm_groups, cfg.dropout)
        use_attn = cfg.native_sizes[level] in cfg.attention_resolutions
        attn = AttentionBlock(ch_out, cfg.num_heads, cfg.norm_groups) if use_attn else None
        return LevelBlock(res, attn)

    def _build_encoder(self, chans: list[int], emb_ch: int):
        enc, down = nn.ModuleList(), nn.ModuleDict()
        ch = chans[0]
        for level, ch_out in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(self.cfg.num_res_blocks):
                blocks.append(self._block(ch, ch_out, emb_ch, level))
                ch = ch_out
            enc.append(blocks)
            if level + 1 < len(chans):
                down[str(level)] = Downsample(ch)
        return enc, down

    def skip_channels(self, level: int) -> list[int]:
        """Channels of the skips decoder level ``level`` consumes, in consumption order."""
        chans = [self.cfg.base_channels * m for m in self.cfg.channel_mult]
        before = chans[level - 1] if level > 0 else chans[0]
        return [chans[level]] * self.cfg.num_res_blocks + [before]

    def _build_decoder(self, chans: list[int], emb_ch: int):
        dec, up = nn.ModuleList([None] * len(chans)), nn.ModuleDict()
        ch = chans[-1]
        for level in reversed(range(len(chans))):
            blocks = nn.ModuleList()
            for skip in self.skip_channels(level):
                blocks.append(self._block(ch + skip, chans[level], emb_ch, level))
                ch = chans[level]
            dec[level] = blocks
            if level > 0:
                up[str(level)] = Upsample(ch)
        return dec, nn.ModuleDict({k: up[k] for k in sorted(up.keys(), key=int)})

    def route(self, name: str) -> "RouteModule":
        """The (cached) :class:`RouteModule` for a route name such as ``"up_8_16"``."""
        if name not in self._routes:
            self._routes[name] = RouteModule(self, name)
        return self._routes[name]

    def forward(self, x: torch.Tensor, t, out_size: int | None = None) -> torch.Tensor:
        """x_t [N,C,r,r], t [N] (or scalar) -> x0 prediction [N,C,out,out]; out defaults to r."""
        size = x.shape[-1]
        if x.shape[-2] != size:
            raise ValueError(f"square inputs only, got {tuple(x.shape)}")
        return self.route(route_name(size, size if out_size is None else out_size))(x, t)


class RouteModule(nn.Module):
    """One route of a :class:`FlexiUNet`, owning only the submodules it runs.

    Submodules are the parent's own objects, registered under the parent's state-dict keys
    (``enc.2.0.res.in_layers.2.weight`` ...), so ``state_dict()`` is a subset of the parent's.
    ``forward(x [N,C,in,in], t [N]) -> [N,C,out,out]``.
    """

    def __init__(self, unet: FlexiUNet, name: str):
        super().__init__()
        cfg = unet.cfg
        self.name = name
        self.in_size, self.out_size = parse_route(name)
        self.base_channels = cfg.base_channels
        self.interp = self.out_size != self.in_size and (
            (self.out_size == cfg.image_size and cfg.top_transition == "interp")
            or cfg.level_of(self.in_size) == cfg.level_of(self.out_size)  # no upsample between them
        )
        run_size = self.out_size if self.interp else self.in_size
        self.level = cfg.level_of(run_size)  # entry level
        self.out_level = cfg.level_of(self.out_size)
        self.enc_levels = list(range(self.level, cfg.num_levels))
        self.decoder = self._decoder_plan(unet)
        # Each upsample's target size: None for the nearest x2; the levels below the output one
        # run at out_size / 2^k, so every size on the way is exact (docs/method.md §10.1).
        self.up_sizes = {}
        for level in range(self.out_level + 1, self.level + 1):
            target = self.out_size >> (level - 1 - self.out_level)
            current = run_size if level == self.level else self.out_size >> (level - self.out_level)
            self.up_sizes[str(level)] = None if target == 2 * current else target
        self._share(unet)

    def _decoder_plan(self, unet: FlexiUNet) -> list[tuple[int, int, list[int]]]:
        """Per decoder level run, deepest first: ``(level, blocks fed a real skip, channels of
        the zero skips fed to the blocks after them)``.

        ``"full"``: every level runs all ``num_res_blocks + 1`` blocks, the entry level's
        last one taking the entry features; an up route then runs all of level ``l-1``'s
        blocks on zero skips. ``"authors"``: the entry level runs ``num_res_blocks`` blocks on
        real skips (an up route adds its last block on a zero skip, for the upsample it
        carries) and level ``l-1`` runs ``num_res_blocks`` blocks on zero skips.
        """
        authors, blocks = unet.cfg.route_style == "authors", unet.cfg.num_res_blocks
        goes_up = self.out_level < self.level
        plan = []
        for level in reversed(self.enc_levels):
            if authors and level == self.level:
                plan.append((level, blocks, unet.skip_channels(level)[-1:] if goes_up else []))
            else:
                plan.append((level, blocks + 1, []))
        for level in range(self.level - 1, self.out_level - 1, -1) if goes_up else ():
            zeros = unet.skip_channels(level)
            plan.append((level, 0, zeros[:blocks] if authors else zeros))
        return plan

    def _share(self, unet: FlexiUNet) -> None:
        """Register the parent's submodules this route uses, under the parent's keys."""
        levels, last = self.enc_levels, unet.cfg.num_levels - 1

        def pick(table: nn.ModuleDict, keys: list[int]) -> nn.ModuleDict:
            return nn.ModuleDict({str(k): table[str(k)] for k in keys})

        self.time_embed, self.conv_in = unet.time_embed, unet.conv_in
        self.entry = pick(unet.entry, [self.level] if str(self.level) in unet.entry else [])
        self.enc = nn.ModuleDict({str(l): unet.enc[l] for l in levels})
        self.down = pick(unet.down, [l for l in levels if l < last])
        self.middle = unet.middle
        self.dec = nn.ModuleDict({str(level): nn.ModuleList(unet.dec[level][:real + len(zeros)])
                                  for level, real, zeros in self.decoder})  # the blocks it runs
        self.up = pick(unet.up, [l for l in range(self.out_level + 1, self.level + 1)] +
                       [l for l in levels if l > self.level])
        self.exit = pick(unet.exit, [self.out_level] if str(self.out_level) in unet.exit else [])
        self.head = unet.head

    @property
    def training(self) -> bool:
        """Train/eval mode is that of the (shared) submodules, i.e. the parent's."""
        return self._modules["head"].training if "head" in self._modules else False

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # Module.train() sets the shared children's flags; nothing of our own to keep

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_size={self.in_size}, out_size={self.out_size}"

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t_emb = timestep_embedding(as_timesteps(t, x), self.base_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # [N, 4*base]
        if self.interp:
            x = resize(x, self.out_size)
        h = self.conv_in(x)
        if str(self.level) in self.entry:
            h = self.entry[str(self.level)](h)
        skips = [h]
        for level in self.enc_levels:
            for block in self.enc[str(level)]:
                h = block(h, emb)
                skips.append(h)
            if str(level) in self.down:
                h = self.down[str(level)](h)
                skips.append(h)
        h = self.middle(h, emb)
        for level, real, zero_channels in self.decoder:
            blocks = self.dec[str(level)]
            for block in blocks[:real]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            for block, channels in zip(blocks[real:], zero_channels):  # skips never computed
                zeros = h.new_zeros((h.shape[0], channels, h.shape[2], h.shape[3]))
                h = block(torch.cat([h, zeros], dim=1), emb)
            if str(level) in self.up:
                h = self.up[str(level)](h, self.up_sizes.get(str(level)))
        if str(self.out_level) in self.exit:
            h = self.exit[str(self.out_level)](h)
        return self.head(h)

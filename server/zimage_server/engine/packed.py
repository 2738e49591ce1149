"""Padding-free packed forwards of Z-Image's transformer for samples of different sizes (issue 19).

diffusers' ``ZImageTransformer2DModel.forward`` pads every sample of a batch to the longest sequence
([batch, longest, dim] plus an attention mask), so a 256² and a 512² image in one forward cost two 512²
samples. ``packed_forward`` runs the *same modules* (the model's own weights and submodules; nothing is
copied) over every sample's tokens concatenated along the sequence, [1, sum of lengths, dim]:

- per-token work (embedders, RMSNorm/LayerNorm, q/k/v/out and feed-forward linears) runs once over all
  tokens, exactly as it would per sample;
- what depends on the sample is applied per segment: RoPE frequencies come from each sample's own
  position ids (diffusers' ``patchify_and_embed``), the timestep modulation (adaLN scale/gate, final
  layer scale) is computed per sample and applied to its tokens, and attention runs within each sample.
  Samples are sorted by length first, so samples of equal length (a size's requests, CFG rows, images of
  one request) lie side by side and each *run* of them is one batched call: one ``dispatch_attention_fn``
  and one modulation multiply per run of equal lengths, not per sample. Exact, and the simplest thing on a
  CPU; on a GPU the remaining runs are what FlexAttention document masks or varlen flash attention
  (``cu_seqlens``) would take in one kernel (not built);
- the order is diffusers': image tokens (each sample's inner padding to a multiple of 32 included, as a
  solo forward has it) through the noise refiner, caption tokens through the context refiner, then
  per sample [image, caption] through the main layers, the final layer and ``unpatchify``.

The engine packs a forward only when padding would be at least ``engine.PACK_MIN_PADDING`` of it: different
image sizes, or small images with captions of very different lengths. Same-size samples whose captions differ
by a block or two of 32 tokens pad a few percent, which the padded path (compiled under ``--compile``) pays
more cheaply than an eager packed forward saves.

A sample's output equals diffusers' forward of that sample alone up to float rounding
(tests/test_packed.py states the tolerance). Not covered, so the engine uses the padded path for them:
LoRA forwards (``engine.lora.MixedLoraLinear`` selects adapters by row = sample of dim 0, and a packed
sequence has one row), omni mode (SigLIP inputs) and gradient checkpointing (inference only). With
``--compile`` the packed path runs eager: ``compile_repeated_blocks`` compiles each block's ``forward``, which
this module does not call (it calls the blocks' submodules); compiling ``packed_forward`` itself is untried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


@dataclasses.dataclass(frozen=True)
class Run:
    """``count`` consecutive samples from sample ``first`` on, each ``length`` tokens, from token ``start``."""

    first: int
    count: int
    start: int
    length: int

    @property
    def tokens(self) -> slice:
        return slice(self.start, self.start + self.count * self.length)


@dataclasses.dataclass(frozen=True)
class Segments:
    """Where each sample's tokens lie in a packed sequence: ``lengths[i]`` tokens of sample i, in order;
    ``runs``: consecutive samples of equal length, each processed as one batch."""

    lengths: tuple[int, ...]
    runs: tuple[Run, ...]

    @classmethod
    def of(cls, lengths: Sequence[int]) -> Segments:
        lengths = tuple(int(n) for n in lengths)
        runs: list[Run] = []
        start = 0
        for i, n in enumerate(lengths):
            if runs and runs[-1].length == n:
                runs[-1] = dataclasses.replace(runs[-1], count=runs[-1].count + 1)
            else:
                runs.append(Run(first=i, count=1, start=start, length=n))
            start += n
        return cls(lengths, tuple(runs))


def unified_lengths(x: Sequence[torch.Tensor], cap_feats: Sequence[torch.Tensor], patch_size: int = 2,
                    f_patch_size: int = 1) -> list[int]:
    """Each sample's sequence in the main layers: its image patches and caption tokens, each padded to a
    multiple of 32 as diffusers pads them (``SEQ_MULTI_OF``)."""
    return [_round32(_patches(xi, patch_size, f_patch_size)) + _round32(ci.shape[0])
            for xi, ci in zip(x, cap_feats, strict=True)]


def _patches(latents: torch.Tensor, patch_size: int, f_patch_size: int) -> int:
    _, f, h, w = latents.shape
    return (f // f_patch_size) * (h // patch_size) * (w // patch_size)


def padding_share(x: Sequence[torch.Tensor], cap_feats: Sequence[torch.Tensor]) -> float:
    """The share of diffusers' padded main-layer tokens that are padding (0: nothing would be padded)."""
    lengths = unified_lengths(x, cap_feats)
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def _round32(n: int) -> int:
    return -(-n // 32) * 32


def _attention(block: torch.nn.Module, hidden: torch.Tensor, freqs: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor`` over a packed [1, tokens, dim] sequence, attention within each segment."""
    attn = block.attention
    query = attn.to_q(hidden).unflatten(-1, (attn.heads, -1))
    key = attn.to_k(hidden).unflatten(-1, (attn.heads, -1))
    value = attn.to_v(hidden).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = _rotary(query, freqs)
    key = _rotary(key, freqs)
    backend = getattr(attn.processor, "_attention_backend", None)
    outs = []
    for run in segments.runs:  # a run of equal-length samples is one batch: [count, length, heads, head_dim]
        q, k, v = (t[0, run.tokens].unflatten(0, (run.count, run.length)) for t in (query, key, value))
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
        outs.append(out.flatten(0, 1))
    hidden = torch.cat(outs).unsqueeze(0).flatten(2, 3).to(query.dtype)
    output = attn.to_out[0](hidden)
    if len(attn.to_out) > 1:  # dropout
        output = attn.to_out[1](output)
    return output


def _rotary(x_in: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The processor's ``apply_rotary_emb`` (complex multiply in float32), same operation order."""
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs.unsqueeze(2)).flatten(3).type_as(x_in)


def _scaled(x: torch.Tensor, rows: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``x * rows[sample]`` token by token: each run of equal-length segments as [count, length, dim] times its
    samples' rows as [count, 1, dim], broadcast as diffusers' [batch, 1, dim] modulation is (no [tokens, dim]
    copy of the rows is made). ``x`` is [1, tokens, dim], contiguous."""
    out = torch.empty_like(x)
    for run in segments.runs:
        shape = (run.count, run.length, x.shape[-1])
        torch.mul(x[0, run.tokens].view(shape), rows[run.first: run.first + run.count].unsqueeze(1),
                  out=out[0, run.tokens].view(shape))
    return out


def _block(block: torch.nn.Module, x: torch.Tensor, freqs: torch.Tensor, segments: Segments,
           adaln_input: torch.Tensor | None) -> torch.Tensor:
    """``ZImageTransformerBlock.forward`` (no omni noise mask) with the modulation applied per segment."""
    if block.modulation:
        # One row per sample, as diffusers computes it.
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln_input).chunk(4, dim=1)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn_out = _attention(block, _scaled(block.attention_norm1(x), scale_msa, segments), freqs, segments)
        x = x + _scaled(block.attention_norm2(attn_out), gate_msa, segments)
        ffn = block.feed_forward(_scaled(block.ffn_norm1(x), scale_mlp, segments))
        return x + _scaled(block.ffn_norm2(ffn), gate_mlp, segments)
    attn_out = _attention(block, block.attention_norm1(x), freqs, segments)
    x = x + block.attention_norm2(attn_out)
    return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))


def _interleave(first: torch.Tensor, first_lengths: Sequence[int], second: torch.Tensor,
                second_lengths: Sequence[int]) -> torch.Tensor:
    """Per sample, its ``first`` segment then its ``second`` segment (dim 0 of both is tokens)."""
    parts = []
    for a, b in zip(first.split(list(first_lengths)), second.split(list(second_lengths)), strict=True):
        parts += [a, b]
    return torch.cat(parts)


@torch.no_grad()
def packed_forward(transformer: torch.nn.Module, x: Sequence[torch.Tensor], t: torch.Tensor,
                   cap_feats: Sequence[torch.Tensor], *,
                   controlnet_block_samples: Mapping[int, torch.Tensor] | None = None,
                   patch_size: int = 2, f_patch_size: int = 1) -> list[torch.Tensor]:
    """The transformer's forward over samples of any sizes and caption lengths, without padding.

    Same arguments and result as ``ZImageTransformer2DModel.forward(x, t, cap_feats, return_dict=False)[0]``
    in its basic (non-omni) mode: ``x`` a list of [C, F, H, W] latents, ``t`` [samples], ``cap_feats`` a list
    of [L_i, cap_dim]; returns a list of [C, F, H, W]. ``controlnet_block_samples`` are diffusers'
    padded [samples, longest, dim] residuals (sample i's first ``unified_lengths[i]`` rows are its own).
    """
    # Samples of equal length side by side (image length, then caption length), so each run of them is one
    # batched call per block (``Segments.runs``); the results go back in the caller's order.
    image = [_round32(_patches(xi, patch_size, f_patch_size)) for xi in x]
    caption = [_round32(c.shape[0]) for c in cap_feats]
    order = sorted(range(len(x)), key=lambda i: (image[i], caption[i]))
    hints = None
    if controlnet_block_samples:
        hints = {layer: h[order] for layer, h in controlnet_block_samples.items()}
    out = _sorted_forward(transformer, [x[i] for i in order], t[order], [cap_feats[i] for i in order],
                          hints, patch_size, f_patch_size)
    result: list[torch.Tensor] = [out[0]] * len(order)
    for position, sample in enumerate(order):
        result[sample] = out[position]
    return result


def _sorted_forward(tr: torch.nn.Module, x: Sequence[torch.Tensor], t: torch.Tensor, cap_feats: Sequence[torch.Tensor],
                    controlnet_block_samples: Mapping[int, torch.Tensor] | None, patch_size: int,
                    f_patch_size: int) -> list[torch.Tensor]:
    """``packed_forward`` over samples already in length order."""
    key = f"{patch_size}-{f_patch_size}"
    adaln_input = tr.t_embedder(t * tr.t_scale).type_as(x[0])  # [samples, 256]
    # diffusers' own patchify: per-sample patches and captions padded to 32 (pad flags), RoPE position ids.
    x_tok, cap_tok, x_size, x_pos, cap_pos, x_pad, cap_pad = tr.patchify_and_embed(
        list(x), list(cap_feats), patch_size, f_patch_size)
    # A caption's position ids come out longer than its padded tokens (diffusers builds the padded grid, then
    # appends pad ids again); its forward keeps the first len(tokens) of them, per sample: so do we.
    x_pos = [p[: len(f)] for p, f in zip(x_pos, x_tok, strict=True)]
    cap_pos = [p[: len(f)] for p, f in zip(cap_pos, cap_tok, strict=True)]
    x_lengths = [len(p) for p in x_tok]
    cap_lengths = [len(c) for c in cap_tok]
    x_segments = Segments.of(x_lengths)
    cap_segments = Segments.of(cap_lengths)

    # Image tokens: embed, pad token where padded, RoPE; the noise refiner within each image.
    hx = tr.all_x_embedder[key](torch.cat(x_tok))
    hx = torch.where(torch.cat(x_pad).unsqueeze(-1), tr.x_pad_token, hx)
    x_freqs = tr.rope_embedder(torch.cat(x_pos))
    hx, xf = hx.unsqueeze(0), x_freqs.unsqueeze(0)
    for layer in tr.noise_refiner:
        hx = _block(layer, hx, xf, x_segments, adaln_input)

    # Caption tokens: the same, through the context refiner (no modulation).
    hc = tr.cap_embedder(torch.cat(cap_tok))
    hc = torch.where(torch.cat(cap_pad).unsqueeze(-1), tr.cap_pad_token, hc)
    cap_freqs = tr.rope_embedder(torch.cat(cap_pos))
    hc, cf = hc.unsqueeze(0), cap_freqs.unsqueeze(0)
    for layer in tr.context_refiner:
        hc = _block(layer, hc, cf, cap_segments, None)

    # Unified sequence: per sample [image, caption], as diffusers' basic mode orders them.
    unified = _interleave(hx[0], x_lengths, hc[0], cap_lengths).unsqueeze(0)
    freqs = _interleave(x_freqs, x_lengths, cap_freqs, cap_lengths).unsqueeze(0)
    lengths = [a + b for a, b in zip(x_lengths, cap_lengths, strict=True)]
    segments = Segments.of(lengths)
    hints = None
    if controlnet_block_samples:
        hints = {layer: torch.cat([h[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
                 for layer, h in controlnet_block_samples.items()}
    for index, layer in enumerate(tr.layers):
        unified = _block(layer, unified, freqs, segments, adaln_input)
        if hints is not None and index in hints:
            unified = unified + hints[index]

    final = tr.all_final_layer[key]
    scale = 1.0 + final.adaLN_modulation(adaln_input)
    out = final.linear(_scaled(final.norm_final(unified), scale, segments))[0]
    # Each sample's image tokens are the first x_lengths[i] of its segment; unpatchify drops the inner padding.
    per_sample = [seg[:n] for seg, n in zip(out.split(lengths), x_lengths, strict=True)]
    return tr.unpatchify(per_sample, x_size, patch_size, f_patch_size)

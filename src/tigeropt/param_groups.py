"""Parameter groups from rules: lr multipliers by name or module type, no decay for biases and
norm weights, layer-wise lr decay (seed 003, https://kexue.fm/archives/7196).

Seed 003: a CRF on a pretrained encoder fine-tuned at lr 1e-5 learns a meaningless transition
matrix, because the encoder fits the data long before the transitions move; giving the CRF a
100-1000x larger lr fixes it.  :func:`param_groups` turns a model plus such rules into param-group
dicts that any ``torch.optim`` optimizer (and every ``tigeropt`` one) accepts::

    groups = param_groups(model, lr=1e-5, weight_decay=0.01, lr_scale={"crf": 1000})
    print(describe(groups))
    optimizer = torch.optim.AdamW(groups)          # or tigeropt.Tiger(groups), ...

For every trainable parameter p (``requires_grad``; frozen ones are left out), with base ``lr`` and
``weight_decay``:

    lr_p = lr * layer_decay**d(p) * prod(factor for every lr_scale entry / rule "lr_scale" matching p)
    lr_p = the "lr" of the last matching rule that sets one, if any (absolute: no factor applies)
    wd_p = 0 if p matches ``no_decay``, else weight_decay
    wd_p = the "weight_decay" of the last matching rule that sets one, if any (also beats no_decay)

Parameters with equal ``(lr, weight_decay, extra keys)`` share a group; groups come in the order of
their first parameter in ``model.named_parameters()`` and carry ``lr``, ``weight_decay``,
``params`` and (``names=True``) ``param_names``, a key torch >= 2.5 understands and older torch and
tigeropt keep as an extra; torch then wants every later-added group to carry names too.

**Matches.**  A match (an ``lr_scale`` key, a rule's ``"match"``, a ``no_decay`` or
``embeddings`` entry) is one of

* a ``str`` (or compiled ``re.Pattern``): a regular expression searched (``re.search``) in the
  parameter's qualified name, e.g. ``"crf"``, ``r"\\.bias$"``;
* a module type or a tuple of types: the module that holds the parameter, or any module above it,
  is an instance (``nn.Embedding`` matches ``emb.weight``; ``MyBlock`` matches all inside it);
* a callable ``f(name, param, module) -> bool`` (``module``: the one that holds the parameter).

A tied/shared tensor appears once, under its first name in ``named_parameters()``; a match
applies to it if it matches any of its names.  With ``strict=True`` (default) a match that
matches no parameter at all (frozen ones count) raises ``ValueError``, so a typo cannot silently
do nothing; the built-in default entries of ``no_decay``/``embeddings`` are exempt.

**Rules** (``rules=[...]``) are dicts with a ``"match"`` and any of ``"lr_scale"`` (factor,
multiplies like an ``lr_scale`` entry), ``"lr"`` (absolute lr), ``"weight_decay"`` (absolute) and
``"extra"`` (a dict of more keys for the group, e.g. ``{"kind": "embedding"}`` for Tiger's
``lr_scaling`` or ``{"lazy": True}``; later rules win on a shared key).

**Layer-wise lr decay** (``layer_decay=decay``, as in ELECTRA/BEiT fine-tuning).  Blocks are
found with ``block_pattern``, a regex with one group capturing the block index; the default finds
the first ``layers.N.``, ``layer.N.``, ``blocks.N.``, ``block.N.``, ``h.N.`` or ``resblocks.N.`` in
the name (BERT, GPT-2, ViT, LLaMA, ``nn.TransformerEncoder``); all blocks must sit under one prefix
(one stack; give ``block_pattern`` for encoder-decoder models).  With n = largest index + 1,

    d = n - i      for block i                (top block: d = 1)
    d = n + 1      for embeddings (not in a block, matching ``embeddings``; default:
                   nn.Embedding/nn.EmbeddingBag, names containing "embed", cls/dist/mask tokens)
    d = 0          for everything else, i.e. heads on top (classifier, final norm, CRF)

so the head keeps ``lr``, the top block gets ``lr*decay``, the embeddings ``lr*decay**(n+1)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._validate import check_bool, check_int, check_number

__all__ = ["param_groups", "describe", "ParamGroups", "DEFAULT", "DEFAULT_NO_DECAY", "DEFAULT_EMBEDDINGS",
           "DEFAULT_BLOCK_PATTERN", "NORM_TYPES", "BIAS_PATTERN"]

#: A name regex, a module type (or a tuple of them), or ``f(name, param, module) -> bool``.
Match = str | type | tuple | Callable[[str, Tensor, nn.Module], bool]


class _Default:
    """Sentinel: use the built-in default (``no_decay``, ``embeddings``)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()

#: Normalization layers whose weights (and biases) get no weight decay by default.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d, lazy variants
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Biases by name: the last name component is ``bias`` or has ``bias`` as an ``_``-separated word
#: (``bias``, ``in_proj_bias``, ``bias_ih_l0``, ``bias_k``).
BIAS_PATTERN = r"(?:^|\.)(?:\w*_)?bias(?:_\w*)?$"
_NORM_CLASS = re.compile(r"Norm(?:\d+d)?$")


def _norm_by_class_name(name: str, param: Tensor, module: nn.Module) -> bool:
    """Norm modules of other libraries, by class name (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    return bool(_NORM_CLASS.search(type(module).__name__))


#: ``no_decay`` default: biases and every parameter of normalization layers.
DEFAULT_NO_DECAY: tuple[Match, ...] = (BIAS_PATTERN, *NORM_TYPES, _norm_by_class_name)
#: ``embeddings`` default (the bottom of layer-wise decay).
DEFAULT_EMBEDDINGS: tuple[Match, ...] = (
    nn.Embedding, nn.EmbeddingBag, r"(?i)embed",
    r"(?:^|\.)(?:cls_token|dist_token|mask_token|register_tokens)$")
#: Default ``block_pattern``: the first ``layers.N``, ``layer.N``, ``blocks.N``, ``block.N``, ``h.N`` or
#: ``resblocks.N`` in the name, group 1 the index.
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:layers|layer|blocks|block|h|resblocks)\.(\d+)(?:\.|$)"

_RULE_KEYS = ("match", "lr_scale", "lr", "weight_decay", "extra")
_STANDARD_KEYS = ("params", "param_names", "lr", "weight_decay")


@dataclass
class _Alias:
    name: str
    owner: nn.Module
    ancestors: list[nn.Module]


@dataclass
class _Param:
    tensor: Tensor
    aliases: list[_Alias] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.aliases[0].name


class ParamGroups(list):
    """The list :func:`param_groups` returns; ``str()`` gives :func:`describe`'s table."""

    def __str__(self) -> str:
        return describe(self)


def _check_number(value: Any, name: str, positive: bool = False) -> float:
    check_number(name, value, 0.0, lo_open=positive)
    return float(value)


def _is_type_match(m: Any) -> bool:
    if isinstance(m, type):
        return issubclass(m, nn.Module)
    return isinstance(m, tuple) and len(m) > 0 and all(isinstance(t, type) and issubclass(t, nn.Module)
                                                       for t in m)


def _compile(m: Any, what: str) -> Callable[[_Alias, Tensor], bool]:
    """A predicate on one alias of a parameter from a match (see the module docstring)."""
    if isinstance(m, (str, re.Pattern)):
        try:
            rx = re.compile(m)
        except re.error as e:
            raise ValueError(f"Invalid {what}: {m!r} is not a valid regular expression ({e})") from e
        return lambda a, p: rx.search(a.name) is not None
    if _is_type_match(m):
        return lambda a, p: any(isinstance(mod, m) for mod in a.ancestors)
    if callable(m) and not isinstance(m, type):
        return lambda a, p: bool(m(a.name, p, a.owner))
    raise ValueError(f"Invalid {what}: {m!r} (a match is a name regex, an nn.Module type or tuple of types, "
                     "or a callable f(name, param, module) -> bool)")


def _match_list(value: Any, default: tuple[Match, ...], what: str) -> list[tuple[Match, bool]]:
    """``(match, is_builtin_default)`` pairs from a ``no_decay``/``embeddings`` argument."""
    if value is DEFAULT or value is True:
        return [(m, True) for m in default]
    if value is None or value is False:
        return []
    if isinstance(value, (str, re.Pattern)) or callable(value) or _is_type_match(value):
        items: list[Any] = [value]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"Invalid type for {what}: expected a match, a sequence of matches, DEFAULT or None, "
                        f"got {type(value).__name__} ({value!r})")
    return [(m, any(m is d for d in default)) for m in items]


def _collect(model: nn.Module) -> list[_Param]:
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, _Param] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        parts = prefix.split(".") if prefix else []
        ancestors = [modules[".".join(parts[:k])] for k in range(len(parts) + 1)]
        entry = by_id.setdefault(id(p), _Param(p))
        entry.aliases.append(_Alias(name, ancestors[-1], ancestors))
    return list(by_id.values())


def _depths(params: list[_Param], block_pattern: str | None,
            embeddings: list[tuple[Callable[[_Alias, Tensor], bool], Any]]) -> list[int]:
    pattern = DEFAULT_BLOCK_PATTERN if block_pattern is None else block_pattern
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"Invalid block_pattern: {pattern!r} ({e})") from e
    if rx.groups < 1:
        raise ValueError(f"Invalid block_pattern: {pattern!r} (needs a group capturing the block index)")
    index: list[int | None] = []
    prefixes: set[str] = set()
    for entry in params:
        found = rx.search(entry.name)
        if found is None:
            index.append(None)
            continue
        try:
            index.append(int(found.group(1)))
        except (TypeError, ValueError):
            raise ValueError(f"Invalid block_pattern: {pattern!r} (group 1 captured {found.group(1)!r} "
                             f"in {entry.name!r}, not a block index)") from None
        prefixes.add(entry.name[:found.start()])
    found_any = [i for i in index if i is not None]
    if not found_any:
        raise ValueError(f"layer_decay is set but block_pattern {pattern!r} finds no block in the trainable "
                         "parameter names; pass block_pattern=")
    if len(prefixes) > 1:
        raise ValueError(f"block_pattern {pattern!r} finds blocks under several prefixes {sorted(prefixes)}; "
                         "layer-wise decay needs one stack: pass block_pattern=")
    n = max(found_any) + 1
    depths = []
    for entry, i in zip(params, index):
        if i is not None:
            depths.append(n - i)
        elif any(pred(a, entry.tensor) for pred, _ in embeddings for a in entry.aliases):
            depths.append(n + 1)
        else:
            depths.append(0)
    return depths


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    *,
    lr_scale: Mapping[Any, float] | None = None,
    no_decay: Any = DEFAULT,
    layer_decay: float | None = None,
    block_pattern: str | None = None,
    embeddings: Any = DEFAULT,
    rules: Sequence[Mapping[str, Any]] | None = None,
    names: bool = True,
    strict: bool = True,
) -> ParamGroups:
    """Param groups of ``model``'s trainable parameters with per-parameter lr and weight decay.

    See the module docstring for the exact rule.  Args:
        model: the module whose ``named_parameters()`` are grouped.
        lr: base learning rate.
        weight_decay: base weight decay (default 0).
        lr_scale: ``{match: factor}``; factors of all matches multiply (``{"crf": 1000}``,
            ``{nn.Embedding: 0.1}``).
        no_decay: matches that get weight decay 0; default :data:`DEFAULT_NO_DECAY` (biases and all
            parameters of normalization layers); extend with ``(*DEFAULT_NO_DECAY, "pos_embed")``;
            ``None``/``False`` disables.
        layer_decay: layer-wise lr decay factor in (0, 1] (default None: off).
        block_pattern: regex with one group capturing the block index (default
            :data:`DEFAULT_BLOCK_PATTERN`); only used with ``layer_decay``.
        embeddings: matches for the bottom of layer-wise decay (default :data:`DEFAULT_EMBEDDINGS`).
        rules: list of dicts ``{"match": m, "lr_scale": f, "lr": x, "weight_decay": w, "extra": {...}}``
            (all but ``"match"`` optional).
        names: store the parameter names under ``"param_names"`` (default True).
        strict: raise ``ValueError`` for a match that matches no parameter (default True).

    Returns:
        a :class:`ParamGroups` (a list of dicts; ``str()`` is :func:`describe`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid type for model: expected an nn.Module, got {type(model).__name__}")
    check_bool("names", names)
    check_bool("strict", strict)
    if block_pattern is not None and not isinstance(block_pattern, (str, re.Pattern)):
        raise TypeError(f"Invalid type for block_pattern: expected a regex (str) or None, got "
                        f"{type(block_pattern).__name__} ({block_pattern!r})")
    if rules is not None and not isinstance(rules, (list, tuple)):
        raise TypeError(f"Invalid type for rules: expected a list of dicts, got {type(rules).__name__} "
                        f"({rules!r})")
    lr = _check_number(lr, "lr")
    weight_decay = _check_number(weight_decay, "weight_decay")
    if layer_decay is not None:
        layer_decay = _check_number(layer_decay, "layer_decay", positive=True)
        if layer_decay > 1.0:
            raise ValueError(f"Invalid layer_decay: {layer_decay!r} (must be in (0, 1]: lower blocks get "
                             "lr*layer_decay**depth)")

    # (predicate, description, builtin default?) for every match that strictness checks
    checked: list[tuple[Callable[[_Alias, Tensor], bool], str, bool]] = []

    scales: list[tuple[Callable[[_Alias, Tensor], bool], float]] = []
    if lr_scale is not None:
        if not isinstance(lr_scale, Mapping):
            raise TypeError(f"Invalid type for lr_scale: expected a mapping {{match: factor}}, got "
                            f"{type(lr_scale).__name__} ({lr_scale!r})")
        for m, factor in lr_scale.items():
            pred = _compile(m, "lr_scale key")
            scales.append((pred, _check_number(factor, f"lr_scale[{m!r}]")))
            checked.append((pred, f"lr_scale key {m!r}", False))

    compiled_rules: list[tuple[Callable[[_Alias, Tensor], bool], dict[str, Any]]] = []
    for k, rule in enumerate(rules or ()):
        if not isinstance(rule, Mapping):
            raise TypeError(f"Invalid type for rules[{k}]: expected a dict with a 'match' key, got "
                            f"{type(rule).__name__} ({rule!r})")
        if "match" not in rule:
            raise ValueError(f"Invalid rules[{k}]: {rule!r} (must be a dict with a 'match' key)")
        unknown = sorted(set(rule) - set(_RULE_KEYS))
        if unknown:
            raise ValueError(f"Invalid rules[{k}]: unknown keys {unknown} (allowed: {list(_RULE_KEYS)})")
        r: dict[str, Any] = {}
        if "lr_scale" in rule:
            r["lr_scale"] = _check_number(rule["lr_scale"], f"rules[{k}]['lr_scale']")
        if "lr" in rule:
            r["lr"] = _check_number(rule["lr"], f"rules[{k}]['lr']")
        if "weight_decay" in rule:
            r["weight_decay"] = _check_number(rule["weight_decay"], f"rules[{k}]['weight_decay']")
        extra = rule.get("extra", {})
        if not isinstance(extra, Mapping):
            raise TypeError(f"Invalid type for rules[{k}]['extra']: expected a dict, got "
                            f"{type(extra).__name__} ({extra!r})")
        if any(key in _STANDARD_KEYS for key in extra):
            raise ValueError(f"Invalid rules[{k}]['extra']: {extra!r} (must be a dict without the keys "
                             f"{list(_STANDARD_KEYS)}; use the rule's own 'lr'/'weight_decay')")
        r["extra"] = dict(extra)
        pred = _compile(rule["match"], f"rules[{k}]['match']")
        compiled_rules.append((pred, r))
        checked.append((pred, f"rules[{k}]['match'] {rule['match']!r}", False))

    decay_free = [(_compile(m, "no_decay entry"), m, d) for m, d in _match_list(no_decay, DEFAULT_NO_DECAY,
                                                                                 "no_decay")]
    checked += [(pred, f"no_decay entry {m!r}", d) for pred, m, d in decay_free]
    bottom = [(_compile(m, "embeddings entry"), m, d) for m, d in _match_list(embeddings, DEFAULT_EMBEDDINGS,
                                                                               "embeddings")]
    if layer_decay is not None:
        checked += [(pred, f"embeddings entry {m!r}", d) for pred, m, d in bottom]

    params = _collect(model)

    def hits(pred: Callable[[_Alias, Tensor], bool], entry: _Param) -> bool:
        return any(pred(a, entry.tensor) for a in entry.aliases)

    if strict:
        missing = [desc for pred, desc, builtin in checked
                   if not builtin and not any(hits(pred, e) for e in params)]
        if missing:
            raise ValueError(f"{', '.join(missing)} matched no parameter of {type(model).__name__} "
                             "(check the spelling; strict=False allows this)")

    trainable = [e for e in params if e.tensor.requires_grad]
    if layer_decay is not None and trainable:
        depths = _depths(trainable, block_pattern, [(pred, m) for pred, m, _ in bottom])
    else:
        depths = [0] * len(trainable)

    groups: dict[tuple, dict[str, Any]] = {}
    for entry, depth in zip(trainable, depths):
        factor = 1.0
        for pred, f in scales:
            if hits(pred, entry):
                factor *= f
        p_lr: float | None = None
        p_wd: float | None = None
        extra: dict[str, Any] = {}
        for pred, r in compiled_rules:
            if not hits(pred, entry):
                continue
            factor *= r.get("lr_scale", 1.0)
            p_lr = r.get("lr", p_lr)
            p_wd = r.get("weight_decay", p_wd)
            extra.update(r["extra"])
        if p_lr is None:
            p_lr = lr * (layer_decay**depth if layer_decay is not None else 1.0) * factor
        if p_wd is None:
            p_wd = 0.0 if any(hits(pred, entry) for pred, _, _ in decay_free) else weight_decay
        key = (p_lr, p_wd, tuple(sorted((k, _freeze(v)) for k, v in extra.items())))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"params": [], **({"param_names": []} if names else {}),
                                   "lr": p_lr, "weight_decay": p_wd, **extra}
        group["params"].append(entry.tensor)
        if names:
            group["param_names"].append(entry.name)
    return ParamGroups(groups.values())


def _freeze(v: Any) -> Any:
    """A hashable stand-in for a group value (for merging groups with equal extra keys)."""
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _fmt(v: Any) -> str:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if isinstance(v, str) else str(v)


def describe(groups: Iterable[Mapping[str, Any]] | Optimizer, max_names: int = 3) -> str:
    """A table of param groups: one line per group with lr, weight decay, number of tensors and
    elements, the extra keys that differ between groups, and the first ``max_names`` names
    (``param_names``; "-" when the groups carry none), then a total line.

    ``groups`` may be :func:`param_groups`' result, any list of group dicts, or an optimizer.
    """
    check_int("max_names", max_names, 0)
    if isinstance(groups, Optimizer):
        groups = groups.param_groups
    if isinstance(groups, (Mapping, str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError("Invalid type for groups: expected an optimizer or an iterable of param-group "
                        f"dicts, got {type(groups).__name__}")
    groups = list(groups)
    if not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise TypeError("Invalid groups: every param group must be a dict with 'params'")
    keys: list[str] = []
    for g in groups:
        keys += [k for k in g if k not in _STANDARD_KEYS and k not in keys]
    shown = [k for k in keys
             if not all(k in g for g in groups) or len({_fmt(g[k]) for g in groups}) > 1]
    rows = []
    total_t = total_n = 0
    for i, g in enumerate(groups):
        ps = list(g["params"])
        n = sum(p.numel() for p in ps)
        total_t += len(ps)
        total_n += n
        names = list(g.get("param_names") or [])
        shown_names = names[:max_names]
        more = f"... (+{len(names) - max_names})" if len(names) > max_names else ""
        text = ", ".join([*shown_names, *([more] if more else [])]) if names else "-"
        extra = " ".join(f"{k}={_fmt(g[k])}" for k in shown if k in g)
        rows.append((str(i), _fmt(g["lr"]) if "lr" in g else "-",
                     _fmt(g["weight_decay"]) if "weight_decay" in g else "-", str(len(ps)),
                     f"{n:,}", extra, text))
    header = ("group", "lr", "wd", "tensors", "elements", "extra" if shown else "", "names")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(6)]
    align = ["<", "<", "<", ">", ">", "<"]
    lines = ["  ".join(f"{r[c]:{align[c]}{widths[c]}}" for c in range(6) if widths[c]) + "  " + r[6]
             for r in [header, *rows]]
    lines.append(f"total: {total_t} tensors, {total_n:,} elements in {len(groups)} groups")
    return "\n".join(line.rstrip() for line in lines)

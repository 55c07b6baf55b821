"""Moving to emakit from another EMA library: its decay rule, its constructor, its checkpoint.

Three functions, one per thing a user brings along:

- :func:`schedule` turns a peer's decay arguments into an emakit schedule that gives the
  peer's decay sequence *exactly*, off-by-ones and quirks included;
- :func:`ema_like` builds an :class:`emakit.EMA` from the peer's constructor arguments,
  mapping what carries over (device, dtype, buffer handling, excluded names) and refusing
  by name what does not;
- ``load(ema, checkpoint_or_path)`` reads the peer's checkpoint into an EMA: it detects the
  format, sets ``t`` from the peer's step counter and returns the format's name.

Peers (the names :func:`schedule` and :func:`ema_like` take, listed in :data:`PEERS`):
``"timm"`` (ModelEmaV3), ``"diffusers"`` (EMAModel), ``"ema_pytorch"`` (EMA),
``"ema_pytorch_karras"`` (KarrasEMA, also what PostHocEMA tracks), ``"averaged_model"``
(torch's AveragedModel with ``get_ema_multi_avg_fn``), ``"torch_ema"``
(ExponentialMovingAverage), ``"lightning"`` (EMAWeightAveraging), and the training
frameworks' ``"composer"`` (the EMA algorithm) and ``"nemo"`` (the EMA callback).

Time is the peer's own step counter: ``t = n`` after the peer's ``n``-th step, so the same
loop gives the same numbers. A peer schedule gives, for an update over ``(t - dt, t]``, the
product of the decays the peer applies at steps ``t - dt + 1, ..., t`` (1 on steps where the
peer does not update). Called once per peer step it is the peer's sequence; called with
``dt=k`` every ``k`` steps it is the same rule stated per step, exact in emakit's sense (an
unchanged model gives the same average). Nothing here imports a peer. See ``docs/migrate.md``.

    >>> from emakit import migrate
    >>> s = migrate.schedule("diffusers", decay=0.9999)
    >>> round(s(t=100, dt=1), 4)  # diffusers ramps (1 + s) / (10 + s) even without warm-up
    0.9174
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._peers.checkpoints import load
from ._peers.options import _OPTIONS, _option_arguments
from ._peers.schedules import PeerSchedule
from ._peers.trainers import PEERS, REQUIRED
from ._peers.trainers import RULES as _RULES
from ._peers.trainers import rule_arguments as _rule_arguments
from .ema import EMA

__all__ = [
    "PEERS",
    "schedule",
    "ema_like",
    "load",
]


# --------------------------------------------------------------------------- public functions


def _peer(where: str, peer: Any) -> str:
    if not isinstance(peer, str):
        raise TypeError(f"{where}: peer must be a str, one of {', '.join(PEERS)}; got peer={peer!r}")
    name = peer.replace("-", "_")
    if name not in _RULES:
        raise ValueError(f"{where}: unknown peer {peer!r}; known peers: {', '.join(PEERS)}")
    return name


def _unexpected(where: str, name: str, peer: str, accepted: list[str]) -> TypeError:
    return TypeError(
        f"{where}: unexpected argument {name!r}; {_RULES[peer].title} takes {', '.join(accepted)} "
        f"(with the peer's names and defaults)"
    )


def schedule(peer: str, /, **peer_kwargs: Any) -> PeerSchedule:
    """The decay rule of ``peer``, with its own argument names and defaults, as an emakit schedule.

    ``decay(t, dt) = prod(peer_decay(n) for n in t - dt + 1 .. t)``, where ``peer_decay(n)``
    is what the peer applies at its ``n``-th step (1 on steps where it does not update) and
    ``t`` is the peer's step counter. Per peer (formulas in each class's docstring):

    - ``"timm"`` (:class:`TimmV3`): ``decay``, ``min_decay``, ``update_after_step``,
      ``use_warmup``, ``warmup_gamma``, ``warmup_power``. Copies through step
      ``update_after_step + 1``.
    - ``"diffusers"`` (:class:`DiffusersEMAModel`): ``decay``, ``min_decay``,
      ``update_after_step``, ``use_ema_warmup``, ``inv_gamma``, ``power``. Copies through
      step ``update_after_step + 1``; without warm-up it still ramps ``(1 + s) / (10 + s)``.
    - ``"ema_pytorch"`` (:class:`EmaPytorchEMA`): ``beta``, ``update_after_step``,
      ``update_every``, ``inv_gamma``, ``power``, ``min_value``. One step's decay once per
      ``update_every`` calls.
    - ``"ema_pytorch_karras"`` (:class:`EmaPytorchKarrasEMA`): ``sigma_rel`` or ``gamma``,
      ``update_every``. The power decay of one step, one step late, once per ``update_every``.
    - ``"averaged_model"`` (:class:`AveragedModelEMA`): ``decay``, copies at the first update;
      ``"torch_ema"`` (:class:`TorchEMA`): ``decay`` (required), ``use_num_updates``.
    - ``"lightning"`` (:class:`LightningEMA`): ``decay``, ``update_every_n_steps``,
      ``update_starting_at_step``. Copies at the first update; ``decay`` once per update.
    - ``"composer"`` (:class:`ComposerEMA`): ``half_life`` or ``smoothing``, ``ema_start``,
      ``update_interval`` (time strings, ``"1000ba"``). Copies at ``ema_start``.
      ``"nemo"`` (:class:`NeMoEMA`): ``decay`` (required), ``every_n_steps``. Never copies.

    How to call ``update()`` so the peer's numbers come out: ``ema.update()`` after every
    optimizer step, or, for the peers that skip steps (ema-pytorch, Lightning, Composer,
    NeMo), ``ema.update(t=n)`` only after the steps ``n`` where ``schedule(t=n, dt=1) != 1``
    (the same numbers without a pass over the weights at the skipped steps).

    Updating every ``k`` steps with ``dt=k`` multiplies the per-step decays: the peer's rule
    stated per step, exact for any interval. That is the dt-correct alternative for timm,
    diffusers, torch-ema and AveragedModel with the same schedule; for ema-pytorch use
    ``schedule("ema_pytorch", ..., update_every=1)`` (equal to
    ``schedules.start_at(update_after_step, schedules.warmup(inv_gamma, power, min_value, beta))``
    if ``min_value == 0``), for KarrasEMA ``schedules.power(sigma_rel=...)``, for Lightning
    ``schedule("lightning", decay=d, update_starting_at_step=s0)`` (``s0`` its first update);
    call those with ``dt=k``.

        >>> s = schedule("ema_pytorch", beta=0.999, update_after_step=0, update_every=1)
        >>> s(t=1, dt=1), round(s(t=2, dt=1), 4), round(s(t=3, dt=2), 4)  # 3rd: both steps' decays
        (0.0, 0.37, 0.1921)
    """
    where = f"migrate.schedule({peer!r})"
    name = _peer(where, peer)
    accepted = _rule_arguments(_RULES[name])
    for key in peer_kwargs:
        if key in accepted:
            continue
        if key in _option_arguments(name):
            raise TypeError(
                f"{where}: {key} is not part of the decay rule; give it to migrate.ema_like({name!r}, model, ...) "
                f"or the matching argument of emakit.EMA"
            )
        raise _unexpected(where, key, name, accepted)
    required = REQUIRED.get(name)
    if required is not None and required not in peer_kwargs:
        raise TypeError(f"{where}: {required} is required ({_RULES[name].title} has no default)")
    return _RULES[name](**peer_kwargs)


def ema_like(peer: str, model: nn.Module, /, **peer_kwargs: Any) -> EMA:
    """An :class:`emakit.EMA` of ``model`` built from ``peer``'s constructor arguments.

    ``EMA(model, schedule=schedule(peer, **decay_args), buffers=..., include=..., device=...,
    dtype=...)``, with the other arguments mapped per peer:

    - ``timm``: parameters and float buffers averaged (``exclude_buffers=True``: buffers
      copied); ``device``, ``dtype`` carry over.
    - ``diffusers``, ``torch_ema``: parameters only; buffers are read from the model, as the
      peer leaves them there. diffusers' deprecated ``device`` keyword carries over.
    - ``ema_pytorch``, ``ema_pytorch_karras``: parameters and float buffers averaged;
      ``ignore_names``, ``ignore_startswith_names`` and ``param_or_buffer_names_no_ema``
      become ``include`` (each name must exist in the model).
    - ``averaged_model``: parameters averaged, buffers copied (``use_buffers=True``: averaged);
      ``device`` carries over.
    - ``lightning``: parameters and buffers averaged (``use_buffers=False``: buffers copied);
      ``device`` carries over.
    - ``composer``: trainable parameters and buffers averaged. ``nemo``: parameters only;
      ``cpu_offload=True``: ``device="cpu"``; ``validate_original_weights`` is a no-op.

    Names excluded in ema-pytorch (``ignore_*``, ``param_or_buffer_names_no_ema``) are read
    from the model (ema-pytorch keeps ignored ones at their last copy and copies the no-EMA
    ones at each update). Accepted as no-ops, because emakit behaves so anyway: ``foreach`` /
    ``use_foreach``, ``stochastic_rounding_seed``, ``model_cls`` / ``model_config``,
    ``include_online_model`` (emakit never stores the model), ``allow_different_devices``,
    ``move_ema_to_online_device`` and ``coerce_dtype`` (emakit converts device and dtype),
    ``update_model_with_ema_beta`` (without ``update_model_with_ema_every``). Refused, with the
    reason: ``ema_model``, ``update_model_with_ema_every``, ``forward_method_names``,
    ``lazy_init_ema=True``, ``frozen=True``, ``avg_fn`` / ``multi_avg_fn``,
    ``update_starting_at_epoch``, bf16 ``dtype`` with timm's stochastic rounding.

    Where emakit deliberately differs: integer buffers (``num_batches_tracked``) are copied
    at every update (timm V3 does so too; AveragedModel/Lightning/Composer average and
    truncate them, ema-pytorch never updates them); a bf16/fp16 model gets fp32 averages; frozen parameters
    are read from the model (peers that average them get the same values while they stay
    frozen).

    Call ``update()`` as :func:`schedule` says: after every optimizer step (``ema.update()``),
    or for ema-pytorch / Lightning with skipped steps, ``ema.update(t=n)`` after the steps
    ``n`` where the peer updates. Build the EMA where the peer's was built (torch-ema's first
    update keeps part of the construction-time copy).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> ema = ema_like("averaged_model", model, decay=0.99, use_buffers=True)
        >>> ema.update(), ema.update()
        (0.0, 0.99)
    """
    where = f"migrate.ema_like({peer!r})"
    name = _peer(where, peer)
    rule_names, option_names = _rule_arguments(_RULES[name]), _option_arguments(name)
    for key in peer_kwargs:
        if key not in rule_names and key not in option_names:
            raise _unexpected(where, key, name, rule_names + option_names)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    rule = schedule(name, **{k: v for k, v in peer_kwargs.items() if k in rule_names})
    options = _OPTIONS[name](where, model, **{k: v for k, v in peer_kwargs.items() if k in option_names})
    return EMA(model, schedule=rule, **options)

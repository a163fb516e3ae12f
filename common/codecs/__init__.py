"""One adapter codec per aggregation mode (fedavg, ffa, svd): what travels, how nodes rebuild it,
what a reply must look like, and how replies become the next global adapter.

The coordinator and the nodes ask :func:`codec_for`; nothing outside this package compares
the mode's name (``tests/test_codecs.py`` checks). The codec classes import neither torch nor
Flower until used, so the settings can check themselves against them cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedswarm.common.codecs.base import AdapterCodec
from fedswarm.common.codecs.fedavg import FedAvgCodec
from fedswarm.common.codecs.ffa import FfaCodec
from fedswarm.common.codecs.svd import SvdCodec
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from fedswarm.common.config import NodeSettings

CODECS: dict[str, type[AdapterCodec]] = {c.name: c for c in (FedAvgCodec, FfaCodec, SvdCodec)}
MODES = tuple(CODECS)


def codec_class(mode: str) -> type[AdapterCodec]:
    try:
        return CODECS[mode]
    except KeyError:
        raise InputError(f"--aggregation must be {spoken(list(MODES))}, got {mode!r}") from None


def codec_for(cfg: NodeSettings) -> AdapterCodec:
    """The codec of ``cfg.aggregation``, set up with the run's alpha, global rank and server step."""
    return codec_class(cfg.aggregation)(cfg)


def modes_help() -> str:
    return ", ".join(f"{c.name} ({c.help})" for c in CODECS.values())


def spoken(names: list[str]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

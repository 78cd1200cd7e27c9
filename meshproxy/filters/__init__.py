"""Filter registry: config names -> filter classes.

Built-ins are listed in FILTER_TYPES. A team's own filter is named by import
path (``mycompany.mesh:CanaryFilter``) or registered under the
``meshproxy.filters`` entry point group and named by its entry point name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from meshproxy.config import FilterOptionError, FilterSpec
from meshproxy.filters.authz import AuthzFilter
from meshproxy.filters.base import Chain, Filter, FilterContext
from meshproxy.filters.fault import FaultFilter
from meshproxy.filters.headers import HeadersFilter
from meshproxy.filters.mirror import MirrorFilter
from meshproxy.filters.overload import OverloadFilter
from meshproxy.filters.rate_limit import RateLimitFilter
from meshproxy.filters.risk_control import RiskControlFilter
from meshproxy.filters.ticket import TicketFilter
from meshproxy.filters.unit_routing import UnitRoutingFilter

FILTER_TYPES: dict[str, type[Filter]] = {
    HeadersFilter.name: HeadersFilter,
    FaultFilter.name: FaultFilter,
    MirrorFilter.name: MirrorFilter,
    UnitRoutingFilter.name: UnitRoutingFilter,
    TicketFilter.name: TicketFilter,
    AuthzFilter.name: AuthzFilter,
    RiskControlFilter.name: RiskControlFilter,
    RateLimitFilter.name: RateLimitFilter,
    OverloadFilter.name: OverloadFilter,
}

ENTRY_POINT_GROUP = "meshproxy.filters"


def resolve(name: str) -> type[Filter]:
    """The filter class for a config name; FilterOptionError if there is none."""
    if name in FILTER_TYPES:
        return FILTER_TYPES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise FilterOptionError("name", f"cannot import filter module '{module_name}': {e}") from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise FilterOptionError("name", f"module '{module_name}' has no attribute '{attr}'")
        return _check_class(name, cls)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _check_class(name, ep.load())
    known = ", ".join(sorted(FILTER_TYPES))
    raise FilterOptionError(
        "name", f"unknown filter '{name}' (built-in: {known}; or give module:Class)"
    )


def _check_class(name: str, cls: object) -> type[Filter]:
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise FilterOptionError("name", f"'{name}' is not a meshproxy.filters.base.Filter subclass")
    return cls


def build(spec: FilterSpec, context: FilterContext | None = None) -> Filter:
    f = resolve(spec.name).from_options(spec.options_dict())
    if context is not None:
        f.bind(context)
    return f


def validate_spec(spec: FilterSpec) -> Filter:
    return build(spec)


def build_chain(specs: tuple[FilterSpec, ...], context: FilterContext | None = None) -> Chain:
    return Chain([build(s, context) for s in specs])

"""The validated, frozen configuration of one natd virtual network.

Sources, in order of precedence: built-in defaults (the slirp layout, see INTERFACE.md), the TOML
file (``--config``), then the command line (``overrides``). Every option *replaces* the file's
value, including the repeatable ones: ``--forward`` replaces the file's ``[[forward]]`` list and
``--dns-upstream`` replaces ``[dns] upstream`` (which itself replaces resolv.conf).

Every error is a :class:`ConfigError` whose text is one line naming where the bad value came from:
``FILE:LINE: key 'network.mtu': expected an integer, got string`` for the file,
``option --mtu: ...`` for the command line.

One module per job: ``model`` (the frozen types), ``values`` (parsers of single values),
``tomlfile`` (reading the file with key positions), ``load`` (file + command line → Config,
and reload), ``render`` (Config → TOML). This package re-exports the public names.
"""

from natd.config.load import load_config, reload_config
from natd.config.model import (
    Config,
    ConfigError,
    Forward,
    PolicyConfig,
    PolicyRuleConfig,
    StaticLeaseConfig,
)
from natd.config.render import render_config
from natd.config.values import (
    forwards_overlap,
    parse_cidr,
    parse_forward,
    parse_mac,
    parse_ports,
    parse_upstream,
    read_resolv_conf,
)

__all__ = [
    "Config",
    "ConfigError",
    "Forward",
    "PolicyConfig",
    "PolicyRuleConfig",
    "StaticLeaseConfig",
    "forwards_overlap",
    "load_config",
    "parse_cidr",
    "parse_forward",
    "parse_mac",
    "parse_ports",
    "parse_upstream",
    "read_resolv_conf",
    "reload_config",
    "render_config",
]

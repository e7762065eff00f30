"""Migration settings: strict where an operator writes them, layered when used."""
from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ferry.hostconfig import HostConfig
from ferry.migration.models import MigrateOptions, Mode, default_channels
from ferry.models import MigrationSettings


@pytest.mark.parametrize("bad,field", [
    ({"timeout_s": True}, "timeout_s"), ({"parallel": 2.0}, "parallel"),
    ({"parallel": 0}, "parallel"), ({"compress": "lz4"}, "compress"),
    ({"on_timeout": "explode"}, "on_timeout"), ({"paralel": 2}, "paralel"),
    ({"postcopy": "sometimes"}, "postcopy"), ({"postcopy": True}, "postcopy"),
])
def test_a_hosts_migration_section_is_strict(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        HostConfig.model_validate({"migration": bad})


def test_each_tunable_comes_from_the_first_layer_that_sets_it() -> None:
    request = MigrationSettings(max_downtime_ms=90)
    domain = MigrationSettings(parallel=2, max_downtime_ms=50)
    host = MigrationSettings(parallel=4, compress="zstd", timeout_s=30)
    opts = MigrateOptions.resolve(Mode.live, request, domain, host)
    assert (opts.max_downtime_ms, opts.parallel, opts.compress, opts.timeout_s,
            opts.on_timeout, opts.bandwidth_mibps) == (90, 2, "zstd", 30.0, "pause", 0)
    assert opts.multifd
    plain = MigrateOptions.resolve(Mode.live, None, None, MigrationSettings())
    assert plain.parallel == default_channels() and plain.compress == "none"
    assert not MigrateOptions.resolve(Mode.live, MigrationSettings(parallel=1)).multifd


def test_postcopy_comes_from_the_layers_and_is_off_by_default() -> None:
    assert MigrateOptions.resolve(Mode.live).postcopy == "never"
    host = MigrationSettings(postcopy="auto")
    assert MigrateOptions.resolve(Mode.live, None, None, host).postcopy == "auto"
    domain = MigrationSettings(postcopy="never")
    opts = MigrateOptions.resolve(Mode.live, None, domain, host)
    assert opts.postcopy == "never" and not opts.postcopy_allowed

"""A ``store`` setting of the wrong type is reported without its value (hardening #14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "text",
    [
        # The likely mistake: the URL put in a [store] table, as [dns] holds dns.port.
        f'[store]\nurl = "postgresql://app:{SECRET}@db.internal/mail"\n',
        f'store = ["postgresql://app:{SECRET}@db.internal/mail"]\n',
    ],
)
def test_a_store_of_the_wrong_type_is_not_echoed(tmp_path: Path, text: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config_path=config, env={})
    assert str(raised.value).startswith("store: ")
    assert SECRET not in str(raised.value)

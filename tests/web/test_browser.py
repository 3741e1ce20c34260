"""The dashboard in a real browser: headless Chromium (Debian's, through selenium) clicks
through the pages of ``mailstrom web`` run as a command, over a queue filled by real
deliveries to a loopback SMTP server, and checks what a person sees.

Screenshots of each page go to the test's directory; with ``MAILSTROM_SCREENSHOTS=DIR``
(``scripts/screenshots`` sets it to docs/screenshots) they are written there instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.stores import SQLiteStore
from mailstrom.testing import FakeMX

from .support import CHROMEDRIVER, CHROMIUM, Scenario, chromium, fill_queue, web_server

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None,
    reason="needs Debian's chromium and chromium-driver (scripts/ensure-system-deps browser)",
)


@pytest.fixture(scope="module")
def queue_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Scenario]:
    path = tmp_path_factory.mktemp("web") / "queue.db"
    with FakeMX() as mx:
        scenario = fill_queue(path, mx)
    return path, scenario


@pytest.fixture
def browser() -> Iterator[Any]:
    driver: Any = chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = os.environ.get("MAILSTROM_SCREENSHOTS")
    folder = Path(target) if target else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shoot(driver: Any, folder: Path, name: str) -> None:
    # The whole page, not just the window: make the viewport as tall as the content (the
    # window's own frame takes some of its height, so measure it once resized).
    width = driver.get_window_size()["width"]
    needed = min(max(driver.execute_script("return document.body.scrollHeight"), 300), 2400)
    driver.set_window_size(width, needed)
    frame = needed - driver.execute_script("return window.innerHeight")
    driver.set_window_size(width, needed + frame)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 5000


def _text(driver: Any, css: str) -> str:
    """The text of the element, once the page showing it has loaded (a click on a link or
    a submit button returns before the next page is there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    found = WebDriverWait(driver, 10).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )
    return str(found.text)


def _title(driver: Any, expected: str) -> None:
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(driver, 10).until(expected_conditions.title_is(expected))


def _click(driver: Any, *, link: str | None = None, css: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    if link is not None:
        driver.find_element(By.LINK_TEXT, link).click()
    else:
        driver.find_element(By.CSS_SELECTOR, css).click()


def test_overview_queue_message_retry(
    queue_db: tuple[Path, Scenario], browser: Any, shots: Path, tmp_path: Path
) -> None:
    path, scenario = queue_db
    with web_server(f"sqlite:///{path}", tmp_path) as url:
        browser.get(url + "/")
        _title(browser, "Overview · mailstrom")
        assert _text(browser, "#count-delivered") == "2"  # alice and bob
        assert _text(browser, "#count-deferred") == "1"
        assert _text(browser, "#count-failed") == "1"
        assert _text(browser, "#count-queued") == "4"  # three orders and the held audit
        top = _text(browser, "#top-deferred")
        assert "slow.example" in top and "451 4.7.0 Too many messages" in top
        assert "rate_limited" in top
        _shoot(browser, shots, "overview")

        _click(browser, link="Queue")
        _title(browser, "Queue · mailstrom")
        queue = _text(browser, "#queue")
        assert "Weekly newsletter" in queue and "Order 1002 shipped" in queue
        assert "Your invoice" not in queue  # delivered: not pending
        _shoot(browser, shots, "queue")

        _click(browser, css=f"a[href='/message/{scenario.deferred}']")
        _text(browser, "#recipients")
        assert _text(browser, "#message-state") == "deferred"
        attempts = _text(browser, "table.attempts")
        assert "127.0.0.1" in attempts and "TLSv1" in attempts
        assert "451 4.7.0 Too many messages" in attempts
        assert "Subject Weekly newsletter" in _text(browser, "#headers")
        assert "Weekly newsletter." not in browser.page_source  # no body until asked
        assert scenario.deferred in _text(browser, "h1")
        _shoot(browser, shots, "message")

        # The 451 "Too many messages" paused slow.example (a throttling reply, for 5
        # minutes from the delivery): a retry makes dave due, but no worker sends to it
        # before the pause ends, and the notice says so.
        assert "throttled until" in _text(browser, "#recipients").lower()
        _click(browser, link="Retry now")
        assert "Make the pending recipients" in _text(browser, "#question")
        _shoot(browser, shots, "confirm")
        asked = datetime.now(UTC)
        _click(browser, css="#confirm")
        assert _text(browser, "#done") == "Retry now: 1 recipient due once the pause ends"
        store = SQLiteStore(path, read_only=True)
        try:
            [dave] = store.status(scenario.deferred).recipients
        finally:
            store.close()
        assert dave.next_attempt_at is not None
        assert asked - timedelta(seconds=5) <= dave.next_attempt_at <= datetime.now(UTC)

        _click(browser, link="Show the message as stored")
        assert "Weekly newsletter." in _text(browser, "#body")

        _click(browser, link="Destinations")
        _title(browser, "Destinations · mailstrom")
        assert "slow.example" in _text(browser, "#destinations")


def _suspended(path: Path) -> list[str]:
    store = SQLiteStore(path, read_only=True)
    try:
        return [s.domain for s in store.suspensions(now=datetime.now(UTC))]
    finally:
        store.close()


def test_suspend_then_resume_a_destination(
    queue_db: tuple[Path, Scenario], browser: Any, shots: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    path, _ = queue_db
    with web_server(f"sqlite:///{path}", tmp_path) as url:
        browser.get(url + "/destinations")
        _click(browser, css="#destinations a[href='/action/suspend/slow.example']")
        assert _text(browser, "#question").startswith("Suspend delivery to slow.example?")
        Select(browser.find_element(By.ID, "for")).select_by_visible_text("for 2 hours")
        _click(browser, css="#confirm")
        assert _text(browser, "#done") == "Suspend: suspended for 2h"
        assert "suspended until" in _text(browser, "#destinations")
        assert _suspended(path) == ["slow.example"]
        browser.get(url + "/destinations")
        _shoot(browser, shots, "destinations")

        _click(browser, css="#destinations a[href='/action/resume/slow.example']")
        assert _text(browser, "#question").startswith("Resume delivery to slow.example?")
        _click(browser, css="#confirm")
        assert _text(browser, "#done") == "Resume: resumed"
        assert "suspended" not in _text(browser, "#destinations")
        assert _suspended(path) == []


def test_a_forged_form_is_refused(
    queue_db: tuple[Path, Scenario], browser: Any, tmp_path: Path
) -> None:
    path, scenario = queue_db
    mid = scenario.queued[0]
    with web_server(f"sqlite:///{path}", tmp_path) as url:
        browser.get(f"{url}/action/cancel/{mid}")
        # What a cross-site form would send: everything but the right CSRF token.
        browser.execute_script("document.querySelector('input[name=csrf]').value = 'forged'")
        _click(browser, css="#confirm")
        assert "did not come from this dashboard" in _text(browser, "#problem")
        browser.get(f"{url}/message/{mid}")
        assert _text(browser, "#message-state") == "queued"


def test_with_a_token_the_browser_must_log_in(
    queue_db: tuple[Path, Scenario], browser: Any, shots: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    path, _ = queue_db
    with web_server(f"sqlite:///{path}", tmp_path, token="correct horse battery") as url:
        browser.get(url + "/queue")
        _title(browser, "Log in · mailstrom")
        _shoot(browser, shots, "login")
        browser.find_element(By.ID, "token").send_keys("wrong")
        _click(browser, css="#login")
        assert _text(browser, "#login-failed") == "That is not the token."
        browser.find_element(By.ID, "token").send_keys("correct horse battery")
        _click(browser, css="#login")
        _title(browser, "Queue · mailstrom")  # back where it was going
        _click(browser, css=".logout button")
        _title(browser, "Log in · mailstrom")


def test_readable_on_a_phone(queue_db: tuple[Path, Scenario], shots: Path, tmp_path: Path) -> None:
    path, scenario = queue_db
    driver: Any = chromium(width=390, height=844)
    try:
        with web_server(f"sqlite:///{path}", tmp_path) as url:
            for page, name in (("/", "phone-overview"), (f"/message/{scenario.failed}", None)):
                driver.get(url + page)
                # Wide tables scroll inside their box; the page itself never scrolls sideways.
                assert driver.execute_script(
                    "return document.documentElement.scrollWidth <= window.innerWidth"
                ), page
                if name:
                    _shoot(driver, shots, name)
    finally:
        driver.quit()

"""The status page and the recent-tasks list it polls, served under a route prefix.

The browser tests drive a real headless Chromium (Debian's chromium + chromium-driver, which
``scripts/setup.sh test`` installs where it may): one sees a running task, presses its cancel
button and sees the task cancelled; one sees the live charts drawn. The last test restarts
the pool: its tasks stay listed.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import ray

from orch.pools.actor import pool_handle
from tests.conftest import home_config, read_sse, wait_for

pytestmark = pytest.mark.integration

PREFIX = "/uitest"
NAMESPACE = "uitest"  # the deploy fixture names the app's namespace after the app
LONG_TASK = {"prompt": "Once upon a time", "max_tokens": 1500, "seed": 11}
WAIT_S = 60


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    # One slot: a long task holds it and the next one queues (the tests below rely on that).
    return deploy(home_config(slots=1), name=NAMESPACE, route_prefix=PREFIX)


def browser_binaries() -> tuple[str | None, str | None]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return chrome, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome, driver_path = browser_binaries()
    if not chrome or not driver_path:
        pytest.skip("headless Chromium is not installed (Debian packages chromium and chromium-driver; "
                    "`bash scripts/setup.sh test` installs them as root or with passwordless sudo)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path, log_output=str(log)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def page_url(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/") + "/ui"


def start_long_task(client: httpx.Client) -> str:
    """A long task, once it holds the pool's only slot (so the next one queues at position 0)."""
    task_id = client.post("/v2/tasks", json=LONG_TASK).json()["task_id"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states = {t["task_id"]: t["state"] for t in client.get("/v2/tasks").json()["tasks"]}
        if states.get(task_id) == "running":
            return task_id
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not start within {WAIT_S} s")


def finish(client: httpx.Client, body: dict) -> str:
    admitted = client.post("/v2/tasks", json=body)
    assert admitted.status_code == 202, admitted.text
    task_id = admitted.json()["task_id"]
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
        events = read_sse(stream)
    assert events[-1][1] == "end"
    return task_id


def test_recent_tasks_lists_newest_first_without_prompts(client):
    first = finish(client, {"prompt": "A secret prompt about llamas", "max_tokens": 3, "seed": 1})
    second = finish(client, {"prompt": "A secret prompt about llamas", "max_tokens": 2, "seed": 2, "priority": "batch"})
    response = client.get("/v2/tasks")
    assert response.status_code == 200, response.text
    assert "secret prompt" not in response.text
    body = response.json()
    assert body["unreachable_pools"] == []
    rows = {row["task_id"]: row for row in body["tasks"]}
    assert [row["task_id"] for row in body["tasks"]][:2] == [second, first]
    assert rows[first] | {"age_ms": 0} == {"task_id": first, "pool_id": "default", "state": "ended", "priority": "interactive",
                                           "tokens_out": 3, "queue_position": None, "age_ms": 0}
    assert rows[second]["priority"] == "batch" and rows[second]["tokens_out"] == 2
    assert rows[second]["age_ms"] <= rows[first]["age_ms"]
    assert [row["task_id"] for row in client.get("/v2/tasks", params={"limit": 1}).json()["tasks"]] == [second]


def test_recent_tasks_shows_queue_positions_and_cancelled_state(client):
    running = start_long_task(client)
    queued = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4}).json()["task_id"]
    try:
        rows = {row["task_id"]: row for row in client.get("/v2/tasks").json()["tasks"]}
        assert rows[queued]["state"] == "queued" and rows[queued]["queue_position"] == 0
        assert rows[running]["state"] == "running"
    finally:
        assert client.post(f"/v2/tasks/{queued}/cancel").status_code == 204
        assert client.post(f"/v2/tasks/{running}/cancel").status_code == 204
    rows = {row["task_id"]: row for row in client.get("/v2/tasks").json()["tasks"]}
    assert rows[queued]["state"] == rows[running]["state"] == "cancelled"
    assert rows[queued]["queue_position"] is None


def test_recent_tasks_limit_is_checked(client):
    for bad in ("0", "501", "ten", "-1"):
        response = client.get("/v2/tasks", params={"limit": bad})
        assert response.status_code == 400, bad
        assert response.json()["code"] == "INVALID_PARAMS"


def test_recent_tasks_is_documented_and_the_page_is_not(client):
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v2/tasks"]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RecentTasks"}
    assert "TaskSummary" in document["components"]["schemas"]
    assert "post" in document["paths"]["/v2/tasks"]
    assert "/ui" not in document["paths"] and "/" not in document["paths"]


def test_root_redirects_to_the_page_under_the_prefix(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == f"{PREFIX}/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_status_page_cancels_a_running_and_a_queued_task(client, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url(client))
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#pools tr[data-key="default"][data-ready="true"]'))
    # Auth is off (the home profile): no sign-in, no sign-out, nothing stored.
    assert not browser.find_element(By.ID, "signin").is_displayed()
    assert not browser.find_element(By.ID, "signout").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0

    running = start_long_task(client)
    queued = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4}).json()["task_id"]
    try:
        def row(task_id: str, state: str):
            found = browser.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{task_id}"][data-state="{state}"]')
            return found[0] if found else None

        running_row = wait.until(lambda d: row(running, "running"))
        queued_row = wait.until(lambda d: row(queued, "queued"))
        assert queued_row.find_element(By.CSS_SELECTOR, "td:nth-child(6)").text == "0"
        # The summary comes from the pools' health, polled on its own beat: it catches up.
        wait.until(lambda d: "1 running" in (text := d.find_element(By.ID, "summary").text) and "1 queued" in text)

        queued_row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        wait.until(lambda d: row(queued, "cancelled"))
        running_row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        cancelled = wait.until(lambda d: row(running, "cancelled"))
        assert not cancelled.find_element(By.CSS_SELECTOR, "button.cancel").is_displayed()
    finally:
        for task_id in (queued, running):
            client.post(f"/v2/tasks/{task_id}/cancel")

    states = {t["task_id"]: t["state"] for t in client.get("/v2/tasks").json()["tasks"]}
    assert states[running] == states[queued] == "cancelled"
    assert browser.find_element(By.ID, "banner").is_displayed() is False
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_status_page_shows_an_unreachable_server(client, browser):
    """The page keeps its last view and says it cannot refresh, instead of failing silently."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url(client))
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#pools tr[data-key="default"]'))
    # Point the page's relative URLs at a prefix nobody serves by rewriting its base.
    browser.execute_script("history.replaceState(null, '', '/no-such-prefix/ui')")
    banner = wait.until(lambda d: d.find_element(By.ID, "banner") if d.find_element(By.ID, "banner").is_displayed() else None)
    assert "Cannot refresh" in banner.text


def test_live_series_has_what_this_replica_relayed(client):
    finish(client, {"prompt": "Once upon a time", "max_tokens": 5, "seed": 3})
    pools = client.get("/v2/ui/series").json()["pools"]
    default = pools["default"]
    assert sum(default["tokens_per_s"]) >= 5
    assert any(ms is not None and ms > 0 for ms in default["ttft_ms"])
    assert len(default["ago_s"]) == len(default["queue_depth"]) and all(0 <= ago <= 300 for ago in default["ago_s"])
    assert client.get("/v2/ui/series", params={"seconds": "0"}).status_code == 400


def test_status_page_draws_live_charts(client, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    finish(client, {"prompt": "Once upon a time", "max_tokens": 5, "seed": 4})
    browser.get_log("browser")  # what earlier tests left in the log
    browser.get(page_url(client))
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
    for chart in ("chart-ttft", "chart-tokens", "chart-queue"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#{chart} [data-pool="default"]'))
    assert "default" in browser.find_element(By.ID, "legend").text
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_tasks_stay_listed_after_their_pool_restarts(client):
    """Runs last in this module: it restarts the pool the other tests use."""
    done = finish(client, {"prompt": "Once upon a time", "max_tokens": 2, "seed": 5})
    running = start_long_task(client)  # the ingress has seen it running
    killed = pool_handle("default", NAMESPACE)
    ray.kill(killed, no_restart=True)

    def replaced():
        try:
            return pool_handle("default", NAMESPACE)._actor_id != killed._actor_id
        except ValueError:  # between the old actor and the new one
            return False

    wait_for(replaced, WAIT_S, every_s=0.25)
    pool = wait_for(lambda: (p := client.get("/readyz").json()["pools"]["default"])["ready"] and p, WAIT_S, every_s=0.25)
    assert "restarting in" not in (pool["last_error"] or "")
    health = client.get("/v2/pools/default/health").json()
    assert "restarting in" not in (health["last_error"] or "")
    answer = wait_for(lambda: (a := client.get("/v2/tasks").json())["unreachable_pools"] == [] and a, WAIT_S)
    states = {t["task_id"]: t["state"] for t in answer["tasks"]}
    assert states[done] == "ended" and states[running] == "lost"

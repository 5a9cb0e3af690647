"""The auth seam through Serve's real HTTP proxy: every route needs the token."""

from __future__ import annotations

import re

import httpx
import pytest

from orch.config import ConfigError, parse_config
from orch.serve.deployment import build_application
from tests.conftest import home_config
from tests.integration.test_ui import browser  # noqa: F401 (the headless Chromium fixture)

pytestmark = pytest.mark.integration

TOKEN = "it-token-abcdefghijklmnop"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    return deploy(config, name="orch-auth", route_prefix="/auth")


def authed(client: httpx.Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_every_documented_route_refuses_requests_without_the_token(client):
    document = client.get("/openapi.json", headers=authed(client))
    assert document.status_code == 200
    walked = 0
    for path, operations in document.json()["paths"].items():
        concrete = re.sub(r"{[^}]+}", "x1", path)
        for method in operations:
            if path == "/healthz":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-token-000000"}, {"Authorization": TOKEN}):
                response = client.request(method.upper(), concrete, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert TOKEN not in response.text
            walked += 1
    assert walked >= 12


def test_the_token_opens_the_api(client):
    assert client.get("/readyz").status_code == 401
    assert client.get("/readyz", headers=authed(client)).status_code == 200
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4}, headers=authed(client))
    assert admitted.status_code == 202
    with client.stream("GET", admitted.json()["streams"]["sse"].removeprefix(""), headers=authed(client)) as stream:
        assert stream.status_code == 200
        assert "event: end" in "".join(stream.iter_text())


def test_cors_is_off_by_default(client):
    response = client.get("/healthz", headers={"Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in response.headers


def test_beyond_loopback_without_a_token_refuses_to_start(ray_session):
    config = home_config()
    config["server"] = {"host": "0.0.0.0"}
    with pytest.raises(ConfigError, match="no bearer token is configured"):
        build_application(parse_config(config))


def test_loopback_bypass_sees_the_real_client_address_through_the_proxy(deploy):
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": True}
    client = deploy(config, name="orch-auth-bypass", route_prefix="/bypass")
    response = client.get("/v2/meta/version")
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- the status page with auth on


def test_the_status_page_itself_is_open_and_holds_no_data(client):
    """The page is static HTML: it loads without the token and asks for it; every call it
    makes (pools, tasks, cancel) still needs the token."""
    page = client.get("/ui")
    assert page.status_code == 200 and 'id="signin"' in page.text
    assert client.get("/", follow_redirects=False).status_code == 307
    assert client.get("/v2/tasks").status_code == 401
    assert client.get("/readyz").status_code == 401


def _long_task(client: httpx.Client) -> str:
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 1500, "seed": 5},
                           headers=authed(client))
    assert admitted.status_code == 202, admitted.text
    return admitted.json()["task_id"]


def test_status_page_sign_in_shows_the_pools_and_cancels_a_task(client, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    url = str(client.base_url).rstrip("/") + "/ui"
    browser.get(url)
    # Without the token: the sign-in and nothing else.
    signin = wait.until(lambda d: d.find_element(By.ID, "signin") if d.find_element(By.ID, "signin").is_displayed() else None)
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#pools tbody tr") == []
    # A wrong token is refused and the sign-in stays.
    browser.find_element(By.ID, "token").send_keys("wrong-token-000000")
    browser.find_element(By.ID, "signin-button").click()
    wait.until(lambda d: "refused" in d.find_element(By.ID, "signin-error").text)
    assert not browser.find_element(By.ID, "app").is_displayed()
    # The right one: the pools show, and a task can be cancelled.
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "signin-button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#pools tr[data-key="default"][data-ready="true"]'))
    assert not signin.is_displayed()
    task_id = _long_task(client)
    try:
        row = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{task_id}"]') or [None])[0])
        wait.until(lambda d: row.find_element(By.CSS_SELECTOR, "button.cancel").is_displayed())
        row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{task_id}"][data-state="cancelled"]'))
    finally:
        client.post(f"/v2/tasks/{task_id}/cancel", headers=authed(client))
    assert TOKEN not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('llama-orch-token')") == TOKEN
    assert browser.execute_script("return document.cookie") == ""
    # Signing out forgets the token and hides the data again.
    browser.find_element(By.ID, "signout").click()
    assert browser.execute_script("return sessionStorage.getItem('llama-orch-token')") is None
    assert browser.find_element(By.ID, "signin").is_displayed() and not browser.find_element(By.ID, "app").is_displayed()
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert severe == [], severe

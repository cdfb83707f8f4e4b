"""The admin panel in a real browser (SPEC §10, §12.24, §12.28): Debian's Chromium
driven by Playwright, with the CDP virtual authenticator behind the real
``navigator.credentials``. The server is the real one, in this event loop; the users
the panel acts on are real SDK and WebSocket clients.

Every page is saved as a screenshot under ``.artifacts/screenshots/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from sovereign.client import Client
from sovereign.client.authenticator import SoftwareAuthenticator
from sovereign.client.errors import SessionEnded
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls
from tests.helpers.flows import resume
from tests.helpers.server import running_server
from tests.helpers.wsclient import WsClient

CHROMIUM = os.environ.get("SOVEREIGN_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / ".artifacts" / "screenshots"

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
        reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)",
    ),
    pytest.mark.timeout(180),
]


async def _virtual_authenticator(context: Any, page: Any) -> None:
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
            }
        },
    )


async def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.wait_for_load_state("networkidle")
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def _ws_user(srv: Any, name: str) -> tuple[str, WsClient]:
    """An operator-made user (like ``sovereign user create --print-token``) online."""
    user = await srv.app.auth.create_user(name)
    _s, token = await srv.app.auth.create_session(user.user_id, None, "cli")
    c = await WsClient.connect(srv.url)
    await resume(c, token)
    return user.user_id, c


async def test_admin_panel_in_chromium(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", registration="invite") as srv:
        code = await srv.app.auth.ensure_bootstrap()
        setup_url = srv.app.admin_url(f"/admin/setup?token={code}")
        assert setup_url is not None and setup_url.startswith("http://localhost:")
        base = setup_url.split("/admin/")[0]
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 820})
                page = await context.new_page()
                await _virtual_authenticator(context, page)
                await _story(srv, page, base, setup_url)
            finally:
                await browser.close()


async def _story(srv: Any, page: Any, base: str, setup_url: str) -> None:
    expect = playwright_api.expect

    # 1. The first-start URL's setup page registers the first admin's passkey.
    await page.goto(setup_url)
    await expect(page.get_by_role("heading", name="Welcome to Sovereign")).to_be_visible()
    await _shot(page, "01-setup")
    await page.fill("#username", "root")
    await page.fill("#display_name", "Root Admin")
    await page.click("#setup-submit")
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    assert "token=" not in page.url  # the one-time code does not linger in the URL
    root = await srv.app.storage.users.get_by_username("root")
    assert root is not None and root.is_admin
    await expect(page.locator(".stat").first).to_be_visible()
    await _shot(page, "02-dashboard")

    # 2. Sign out, then sign in with the passkey just made.
    await page.click("#sign-out")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await _shot(page, "03-sign-in")
    await page.click("#sign-in")
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

    # 3. Create an invite; a new user registers with it over the WebSocket (SDK).
    await page.goto(base + "/admin/#/invites")
    await expect(page.get_by_role("heading", name="Invites")).to_be_visible()
    await page.select_option("#invite-expiry", "24")
    await page.click("#create-invite")
    await expect(page.locator("#invite-code")).to_be_visible()
    invite = await page.input_value("#invite-code")
    assert invite in await page.input_value("#invite-link")
    await _shot(page, "04-invites")
    bob = Client(srv.url, authenticator=SoftwareAuthenticator(), auto_reconnect=False)
    await bob.connect()
    device = await bob.register("bob", display_name="Bob", invite_code=invite)
    await page.reload()
    await expect(page.locator("td .badge", has_text="used")).to_have_count(2)  # + the setup code

    # 4. Users: search, detail, disable while bob's SDK client is connected -> 4005.
    await page.goto(base + "/admin/#/users")
    await expect(page.get_by_role("link", name="bob")).to_be_visible()
    await _shot(page, "05-users")
    await page.fill("#user-search", "bo")
    await expect(page.get_by_role("link", name="root")).to_have_count(0)
    await page.get_by_role("link", name="bob").click()
    await expect(page.get_by_role("heading", name="bob")).to_be_visible()
    await expect(page.locator(".badge", has_text="online")).to_have_count(2)  # account + device
    await _shot(page, "06-user-detail")
    await page.click("#disable-user")
    await page.get_by_role("dialog").get_by_role("button", name="Disable account").click()
    with pytest.raises(SessionEnded) as ended:
        await asyncio.wait_for(bob.wait_closed(), 1.0)
    assert ended.value.close_code == 4005
    await expect(page.locator(".badge", has_text="disabled")).to_be_visible()
    assert device.user_id and not (await srv.app.storage.users.get_by_id(device.user_id)).enabled
    await bob.close()

    # 5. Sessions.
    await page.goto(base + "/admin/#/sessions")
    await expect(page.get_by_role("heading", name="Sessions")).to_be_visible()
    await expect(page.get_by_text("Admin panel").first).to_be_visible()
    await _shot(page, "07-sessions")

    # 6. MLS health shows a conversation's epoch after a real commit.
    alice_id, alice = await _ws_user(srv, "alice")
    carol_id, carol = await _ws_user(srv, "carol")
    await carol.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(key_packages=[mls.key_package(carol_id) for _ in range(2)]),
        T.ACK,
    )
    created = await alice.request(
        T.GROUP_CREATE, pb.GroupCreate(title="Project X", member_ids=[carol_id]), T.GROUP_CREATED
    )
    gid = b"panel-group-0001"
    await alice.request(
        T.MLS_COMMIT,
        pb.MLSCommit(
            conversation_id=created.conversation_id,
            commit_data=mls.commit(gid, 0),
            group_info=mls.group_info(gid, 1),
        ),
        T.MLS_COMMIT_BROADCAST,
    )
    await page.goto(base + "/admin/#/mls")
    row = page.locator("#mls-conversations tr", has_text="Project X")
    await expect(row.locator(".epoch")).to_have_text("1")
    await expect(row.locator(".badge", has_text="stored")).to_be_visible()
    await _shot(page, "08-mls-health")

    # 6b. Delete carol from her page: alice, connected, hears GROUP_MEMBER_REMOVED and
    # carol's socket closes 4004.
    await page.goto(base + f"/admin/#/users/{carol_id}")
    await expect(page.get_by_role("heading", name="carol")).to_be_visible()
    await expect(page.get_by_text("Project X")).to_be_visible()
    await page.click("#delete-user")
    await page.get_by_role("dialog").get_by_role("button", name="Delete user").click()
    await expect(page.get_by_role("heading", name="Users")).to_be_visible()
    removed = await alice.wait_for(T.GROUP_MEMBER_REMOVED)
    assert removed.user_id == carol_id
    assert await carol.closed(1.0) == 4004
    await expect(page.get_by_role("link", name="carol")).to_have_count(0)
    await alice.close()
    assert alice_id

    # 7. A setting changes the running server, and a bad value is shown in place.
    await page.goto(base + "/admin/#/settings")
    await expect(page.get_by_role("heading", name="Settings")).to_be_visible()
    await page.fill("#set-rate_limit_burst", "0")
    await page.click("#save-settings")
    await expect(page.locator(".form-error")).to_contain_text("rate_limit_burst")
    assert srv.config.rate_limit_burst != 0
    await page.fill("#set-rate_limit_burst", "25")
    await page.select_option("#set-registration", "closed")
    await page.click("#save-settings")
    await expect(page.locator(".notice")).to_contain_text("Saved")
    assert (srv.config.rate_limit_burst, srv.config.registration) == (25, "closed")
    await _shot(page, "09-settings")

    # 8. Readable on a phone.
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto(base + "/admin/#/dashboard")
    await expect(page.locator(".stat").first).to_be_visible()
    await _shot(page, "10-dashboard-phone")
    await page.goto(base + "/admin/#/users")
    await expect(page.get_by_role("link", name="bob")).to_be_visible()
    await _shot(page, "11-users-phone")
    await page.set_viewport_size({"width": 1280, "height": 820})

    # 9. Sign out: the cookie's session is revoked, the API says 401.
    await page.goto(base + "/admin/#/dashboard")
    await page.click("#sign-out")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    status = await page.evaluate("fetch('/admin/api/me').then(r => r.status)")
    assert status == 401
    await _shot(page, "12-signed-out")

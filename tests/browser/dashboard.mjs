// The operator dashboard in Debian's headless Chromium, against a running cluster (started by
// cli/tests/dashboard.rs): log in, watch a capsule appear and reach `running` without a
// reload, cordon the only host so a create fails, find the failed operation, uncordon,
// retry it and watch the retry succeed. With HANGAR_SCREENSHOTS=<dir>, saves each view.
//
// env: HANGAR_URL, HANGAR_ADMIN_KEY, [HANGAR_SCREENSHOTS], [CHROMIUM=/usr/bin/chromium]
import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = process.env.HANGAR_URL;
const adminKey = process.env.HANGAR_ADMIN_KEY;
const shots = process.env.HANGAR_SCREENSHOTS;
if (!base || !adminKey) throw new Error("HANGAR_URL and HANGAR_ADMIN_KEY are required");
if (shots) mkdirSync(shots, { recursive: true });

const step = (what) => console.log(`-- ${what}`);
function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/// The API, as a script would use it (the dashboard only watches).
async function api(method, path, body) {
  const response = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await response.json();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "hangar-chromium-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1360, height: 860 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(20_000);
page.on("dialog", (dialog) => dialog.accept());
const shot = async (name) => { if (shots) await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true }); };

try {
  step("pages need a session: /dashboard redirects to the login form");
  await page.goto(base + "/dashboard");
  check(page.url().endsWith("/dashboard/login"), `redirected to ${page.url()}`);

  step("a wrong key is refused with a reason");
  await page.fill("#key", "hk_not_a_key");
  await page.click("button[type=submit]");
  await page.getByRole("alert").waitFor();
  check((await page.getByRole("alert").innerText()).includes("not an admin key"), "refusal reason");
  check((await context.cookies()).length === 0, "no session cookie after a refused login");
  await shot("login");

  step("the admin key logs in; the session cookie is HttpOnly and SameSite=Strict");
  await page.fill("#key", adminKey);
  await page.click("button[type=submit]");
  await page.waitForURL(base + "/dashboard");
  const [cookie] = await context.cookies();
  check(cookie && cookie.name === "hangar_session", "session cookie set");
  check(cookie.httpOnly && cookie.sameSite === "Strict" && cookie.path === "/dashboard", JSON.stringify(cookie));
  check(!(await page.evaluate(() => document.cookie)).includes("hangar_session"), "cookie hidden from scripts");

  step("an action without the CSRF token is refused");
  const forged = await page.request.post(base + "/dashboard/hosts/host_00000000000000000000000000000000/cordon", {
    form: { csrf: "forged", back: "/dashboard" }, maxRedirects: 0,
  });
  check(forged.status() === 403, `forged action: ${forged.status()}`);

  step("a new capsule appears and reaches running without a reload");
  await page.evaluate(() => { window.__notReloaded = true; });
  await page.locator("#live.on").waitFor();
  const first = await api("POST", "/v1/capsules", { template: "base" });
  const row = page.locator(`#capsules tr[data-id="${first.capsule.id}"]`);
  await row.locator(".badge.running").waitFor();
  check(await page.evaluate(() => window.__notReloaded === true), "the page was not reloaded");
  await shot("capsules");

  step("cordon the only host from the hosts view");
  await page.click("nav >> text=Hosts");
  await page.locator("#hosts tr[data-host] button:text('Cordon')").first().click();
  await page.locator(".notice", { hasText: "cordoned" }).waitFor();
  await page.locator("#hosts td", { hasText: "cordoned" }).first().waitFor();

  step("a create with no open host fails; it shows among the failed operations");
  await page.goto(base + "/dashboard/operations?status=failed");
  const second = await api("POST", "/v1/capsules", { template: "base" });
  const failedRow = page.locator(`#operations tr[data-id="${second.operation.id}"]`);
  await failedRow.waitFor();
  check((await failedRow.innerText()).includes("create"), "the failed create is listed");
  await shot("operations");

  step("uncordon, then retry the failed operation");
  await page.goto(base + "/dashboard/hosts");
  await page.locator("#hosts tr[data-host] button:text('Uncordon')").first().click();
  await page.locator(".notice", { hasText: "uncordoned" }).waitFor();
  await page.locator("#hosts td", { hasText: "open" }).first().waitFor();
  await shot("hosts");
  await page.goto(base + "/dashboard/operations?status=failed");
  await failedRow.locator("button:text('Retry')").click();
  const notice = page.locator(".notice", { hasText: "Retry accepted" });
  await notice.waitFor();
  const retryId = (await notice.innerText()).match(/op_[0-9a-f]{32}/)[0];

  step("the retry succeeds, live on its page");
  await page.goto(`${base}/dashboard/operations/${retryId}`);
  await page.locator("dl.facts .badge.succeeded").waitFor();
  await shot("operation");
  await page.goto(`${base}/dashboard/capsules/${second.capsule.id}`);
  await page.locator("dl.facts .badge.running").waitFor();
  await shot("capsule");

  step("queues show the kinds and the dead job");
  await page.click("nav >> text=Queues");
  const create = page.locator('#queues tr[data-kind="create"]');
  await create.waitFor();
  check((await create.locator("td").nth(5).innerText()).trim() === "1", "one dead create");
  await shot("queues");

  step("log out ends the session");
  await page.click("form.logout button");
  await page.waitForURL(base + "/dashboard/login");
  await page.goto(base + "/dashboard/hosts");
  check(page.url().endsWith("/dashboard/login"), "logged out");
  // The last line: what the Rust side checks the processes' logs against.
  console.log(JSON.stringify({ ok: true, session: cookie.value, retried: second.operation.id, retry: retryId }));
} finally {
  await context.close();
}

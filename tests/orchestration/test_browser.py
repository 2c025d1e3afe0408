"""The trigger form and the graph as a person sees them: Debian's chromium, driven by Selenium through Debian's
chromedriver (nothing downloads a browser or a driver), against a real Airflow (tests/airflow_server.py) with the
repo's DAGs, started as `make ui` starts it.

It logs in, opens the DAG's trigger form and checks its sections, sees a bad value refused (an empty required field
in the form itself; a resolution the Param's schema forbids by the server, its message shown in the form), triggers
a tiny recipe and checks the run's conf, and opens the run's graph. `make test-browser` runs it (not `make test`);
`DREAMLINE_SCREENSHOTS=docs/images make test-browser` also waits for the run to finish and refreshes docs/operating.md's
screenshots (otherwise they go to the test's temp folder).

What depends on the DAG and its form is in the constants below: the DAG id, the sections and the fields' titles
(plugins/dreamline/params.py), the refused values and their messages.
"""
from __future__ import annotations

import io
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from airflow_server import AirflowServer, airflow_server
from conftest import REPO

pytestmark = pytest.mark.browser

DAG_ID = "lora_dog"  # the sample subject's DAG (dags/subjects.yaml)
SECTIONS = ["This run", "Subject and data", "Data preparation", "Training", "Evaluation and selection",
            "Promotion"]  # params.py
# A tiny recipe (as tests/orchestration/test_e2e.py's), typed into the form: (section, field title, conf key, typed, in the conf)
RECIPE = [
    ("Subject and data", "Dataset version", "dataset_version", "dog-v1", "dog-v1"),
    ("Training", "Max steps", "max_steps", "4", 4),
    ("Training", "Checkpoint interval", "checkpointing_steps", "2", 2),
    ("Training", "Resolution", "resolution", "64", 64),
    ("Evaluation and selection", "Evaluation prompts", "evaluation_prompts",
     "a {instance} in the snow\na red {instance}\na {instance} on the beach\na {instance} with a hat",
     ["a {instance} in the snow", "a red {instance}", "a {instance} on the beach", "a {instance} with a hat"]),
    ("Evaluation and selection", "Screening images per prompt", "images_per_prompt", "1", 1),
    ("Evaluation and selection", "Screening steps", "inference_steps", "2", 2),
    ("Promotion", "Confirmation steps", "confirmation_inference_steps", "2", 2),
]
# Refused by the form itself: a required field (a type without "null") left empty.
REQUIRED = ("Subject and data", "Dataset version")
# Refused by the API server (the form has no check for multipleOf), its reason shown in the form.
BAD = ("Training", "Resolution", "100", "Invalid input for param resolution: 100 is not a multiple of 64")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
VIEWPORT = {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
WAIT = 60  # seconds for anything the UI does once loaded
FIRST_LOAD = 120  # the first page: the UI's bundle is fetched and run on 2 busy cores
TRIGGER_BUTTON = "//button[@aria-label='Trigger Dag']"
RUN_TIMEOUT = 900  # seconds for the whole run, waited for only when screenshots are asked for (2 to 10 min)
START_TIMEOUT = 180  # seconds for the scheduler to start a triggered run


def browser_or_skip() -> None:
    """Skip when Debian's chromium or chromedriver is missing on a developer's machine; in CI, fail."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        why = (f"{' and '.join(missing)} not installed: apt-get install -y --no-install-recommends chromium "
               f"chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(why + " (.ci/run installs them)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> tuple[Path, bool]:
    """Where screenshots go, and whether they are docs/operating.md's (DREAMLINE_SCREENSHOTS=docs/images)."""
    asked = os.environ.get("DREAMLINE_SCREENSHOTS")
    if asked:
        folder = Path(asked) if Path(asked).is_absolute() else REPO / asked
        folder.mkdir(parents=True, exist_ok=True)
        return folder, True
    return tmp_path_factory.mktemp("screenshots"), False


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, models, registry) -> AirflowServer:
    browser_or_skip()
    home = tmp_path_factory.mktemp("browser-home")
    tracking = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"  # make ui's MLflow server creates it before any task
    env = {"DREAMLINE_HOME": str(home), "DREAMLINE_DATASET_REPO": str(registry), "MLFLOW_TRACKING_URI": tracking,
           "DREAMLINE_BASE_MODEL": models["sdxl"], "DREAMLINE_CLIP_MODEL": models["clip"],
           "DREAMLINE_DINO_MODEL": models["dino"], "HF_HUB_OFFLINE": "1"}
    with airflow_server(home / "airflow", env, dag_id=DAG_ID) as server:  # with the gpu pool, sized by make ui
        yield server
        # Stop cleanly and soon: no new run, and a run still going is marked failed, so Airflow stops its tasks
        # (the scheduler waits for running tasks when it stops).
        server.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": True})
        for run in runs(server):
            if run["state"] in ("queued", "running"):
                server.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'])}",
                           {"state": "failed"})


@pytest.fixture(scope="module")
def browser(airflow, tmp_path_factory):
    """Headless chromium at a 1400x1000 viewport, logged in as the admin user."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never fetches anything (the driver is given anyway)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={folder / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(folder / "chromedriver.log")),
                              options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", VIEWPORT)
        page = Page(driver, airflow, folder)
        page.login(f"/dags/{DAG_ID}")
        yield page
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def triggered() -> dict:
    """The run the form triggered, for the graph test."""
    return {}


class Page:
    """The browser and the few things the tests do with Airflow's UI, by what a person sees: labels, titles,
    button names (aria-label), and the UI's own test id for its error alert."""

    def __init__(self, driver, airflow: AirflowServer, folder: Path):
        from selenium.webdriver.common.by import By

        self.driver, self.airflow, self.folder, self.By = driver, airflow, folder, By

    def wait(self, what: str, condition, timeout: float = WAIT):
        """condition(driver) until truthy; on timeout, a screenshot and the page's HTML for the failure."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, ignored_exceptions=(WebDriverException,)).until(condition)
        except TimeoutException:
            stem = self.folder / f"timeout-{time.monotonic_ns()}"
            self.driver.save_screenshot(f"{stem}.png")
            Path(f"{stem}.html").write_text(self.driver.page_source)
            pytest.fail(f"UI: waited {timeout:.0f} s for {what} at {self.driver.current_url}; "
                        f"screenshot {stem}.png, page {stem}.html; Airflow's logs: {self.airflow.logs}")

    def find(self, xpath: str, what: str, timeout: float = WAIT):
        """The first visible element at xpath."""
        def visible(driver):
            return next((e for e in driver.find_elements(self.By.XPATH, xpath) if e.is_displayed()), None)

        return self.wait(what, visible, timeout)

    def login(self, next_path: str, tries: int = 3) -> None:
        """Sign in and wait for `next_path` to show the DAG (its Trigger button). CI once saw the DAG page ask with
        no token right after the sign-in and go back to an empty login form: that is signed in again."""
        for _ in range(tries):
            self.driver.get(f"{self.airflow.url}/auth/login?next={urllib.parse.quote(next_path)}")
            self.find("//input[@name='username']", "the login form", FIRST_LOAD).send_keys(self.airflow.username)
            self.find("//input[@name='password']", "the password field").send_keys(self.airflow.password)
            self.find("//button[@type='submit'][normalize-space()='Sign in']", "the Sign in button").click()
            clicked = time.monotonic()

            def landed(driver) -> str | None:
                if any(e.is_displayed() for e in driver.find_elements(self.By.XPATH, TRIGGER_BUTTON)):
                    return "signed in"
                back = urllib.parse.urlparse(driver.current_url).path.startswith("/auth/login") and any(
                    e.is_displayed() and not e.get_attribute("value")
                    for e in driver.find_elements(self.By.XPATH, "//input[@name='username']"))
                # the form just sent leaves the page within a second; an empty one seconds later is a new one
                return "the login form again" if back and time.monotonic() - clicked > 5 else None

            if self.wait(f"{next_path} after the login", landed, FIRST_LOAD) == "signed in":
                return
        pytest.fail(f"UI: the sign-in did not hold in {tries} tries; Airflow's logs: {self.airflow.logs}")

    def open_trigger_form(self) -> None:
        """The DAG's page, then its Trigger button: the form opens in a dialog."""
        self.driver.get(f"{self.airflow.url}/dags/{DAG_ID}")
        self.find(TRIGGER_BUTTON, "the DAG's Trigger button", FIRST_LOAD).click()
        self.find(f"//*[@role='dialog']//*[normalize-space()='Trigger Dag - {DAG_ID}']", "the trigger form")
        self.section(SECTIONS[-1])  # the Params are loaded

    def section(self, name: str):
        """A section's header (an accordion button) in the form."""
        return self.find(f"//*[@role='dialog']//button[@data-part='item-trigger'][normalize-space()='{name}']",
                         f"section {name!r} of the form")

    def open_section(self, name: str) -> None:
        header = self.section(name)
        if header.get_attribute("aria-expanded") != "true":
            self.scroll_to(header).click()
            self.wait(f"section {name!r} to open", lambda d: header.get_attribute("aria-expanded") == "true")

    def section_flags_an_error(self, name: str) -> bool:
        """The form marks a section holding an invalid field: its header turns red with an alert icon."""
        return len(self.section(name).find_elements(self.By.TAG_NAME, "svg")) > 1  # the chevron, and the icon

    def field(self, section: str, title: str):
        """The row of one Param: its label (the Param's title) and its control."""
        self.open_section(section)
        return self.find(f"//*[@role='dialog']//div[@data-scope='field'][@data-part='root']"
                         f"[.//label[normalize-space(text())='{title}']]", f"field {title!r} in {section!r}")

    def type_into(self, section: str, title: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        row = self.field(section, title)
        control = row.find_element(self.By.XPATH, ".//input[not(@type='hidden')] | .//textarea")
        self.scroll_to(control)
        # On a busy machine the form's controlled inputs can drop a keystroke typed fast: check, and retype
        # slowly, one key at a time, if one was lost.
        for chunks in ([text], list(text)):
            control.send_keys(Keys.CONTROL, "a")
            control.send_keys(Keys.DELETE)
            for chunk in filter(None, chunks):
                control.send_keys(chunk)
                time.sleep(0.02 if len(chunks) > 1 else 0)
            time.sleep(0.2)
            if control.get_attribute("value") == text:
                return
        pytest.fail(f"typed {text!r} into {title!r}, the field holds {control.get_attribute('value')!r}")

    def trigger_button(self):
        return self.find("//*[@role='dialog']//button[normalize-space()='Trigger']", "the form's Trigger button")

    def scroll_to(self, element, block: str = "center"):
        self.driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}})", element)
        return element

    def screenshot(self, path: Path) -> Path:
        small_png(self.driver.get_screenshot_as_png(), path)
        return path


def small_png(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG: a third of the bytes, no visible change for a UI's flat colours."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def runs(airflow: AirflowServer) -> list[dict]:
    status, answer = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns")
    assert status == 200, answer
    return answer["dag_runs"]


def test_the_trigger_form_shows_the_dags_sections(browser, shots):
    browser.open_trigger_form()
    for name in SECTIONS:
        browser.section(name)
    headers = browser.driver.find_elements(browser.By.XPATH, "//*[@role='dialog']//button[@data-part='item-trigger']")
    shown = [h.text.strip() for h in headers if h.text.strip()]
    assert shown[:len(SECTIONS)] == SECTIONS, f"the form's sections, in order: {shown}"  # then Advanced Options
    browser.open_section("Training")
    assert browser.field("Training", "Learning rates").is_displayed()


def test_the_form_accepts_its_own_defaults(browser):
    browser.open_trigger_form()
    flagged = [name for name in SECTIONS if browser.section_flags_an_error(name)]
    assert not flagged and browser.trigger_button().is_enabled(), f"sections flagged with an error: {flagged}"


def test_an_empty_required_field_is_refused_in_the_form(browser):
    browser.open_trigger_form()
    section, title = REQUIRED
    browser.type_into(section, title, "")
    row = browser.field(section, title)
    browser.wait(f"'This field is required' under {title!r}", lambda d: "This field is required" in row.text)
    assert browser.section_flags_an_error(section), f"section {section!r} is not flagged"
    assert not browser.trigger_button().is_enabled(), "the Trigger button is enabled with a required field empty"


def test_a_value_the_params_schema_forbids_is_refused_with_its_reason(browser, airflow, shots):
    before = runs(airflow)
    browser.open_trigger_form()
    section, title, typed, reason = BAD
    browser.type_into(section, title, typed)
    trigger = browser.trigger_button()
    assert trigger.is_enabled(), f"the form itself refused {title} = {typed}: the check moved into the UI"
    browser.scroll_to(trigger).click()
    alert = browser.find("//*[@role='dialog']//*[@data-testid='error-alert']", "the form's error alert")
    browser.wait(f"the alert to say {reason!r}", lambda d: reason in alert.text)
    assert "400 Bad Request" in alert.text, alert.text
    assert browser.find("//*[@role='dialog']", "the form, still open").is_displayed()
    browser.scroll_to(alert, "start")
    browser.screenshot(shots[0] / "trigger-form-refused.png")
    assert runs(airflow) == before, "a refused trigger created a DAG run"


def test_a_tiny_recipe_is_triggered_from_the_form(browser, airflow, shots, triggered):
    browser.open_trigger_form()
    for section, title, _, typed, _ in RECIPE:
        browser.type_into(section, title, typed)
    trigger = browser.trigger_button()
    browser.wait("the Trigger button to be enabled", lambda d: trigger.is_enabled())
    for name in SECTIONS:
        assert not browser.section_flags_an_error(name), f"section {name!r} flagged with the recipe typed in"
    # the picture: the dialog from its top, the Training section open with the recipe's values
    browser.open_section("Training")
    browser.scroll_to(browser.find(f"//*[@role='dialog']//*[normalize-space()='Trigger Dag - {DAG_ID}']",
                                   "the form's title"), "start")
    time.sleep(1)  # the sections open and close with an animation
    browser.screenshot(shots[0] / "trigger-form.png")
    browser.scroll_to(trigger).click()
    # the UI goes to the new run's page
    browser.wait("the new run's page", lambda d: f"/dags/{DAG_ID}/runs/" in d.current_url)
    run_id = urllib.parse.unquote(browser.driver.current_url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
    [run] = [r for r in runs(airflow) if r["dag_run_id"] == run_id]
    assert run["run_type"] == "manual"
    expected = {key: value for _, _, key, _, value in RECIPE} | {"vae": None}  # left empty: the base model's
    assert {key: run["conf"].get(key) for key in expected} == expected, run["conf"]
    triggered["run_id"] = run_id


def test_the_runs_graph_shows_every_task(browser, airflow, shots, triggered):
    run_id = triggered.get("run_id") or pytest.fail("no run was triggered (see the test above)")
    status, answer = airflow.api("GET", f"/dags/{DAG_ID}/tasks")
    assert status == 200, answer
    tasks = {t["task_id"] for t in answer["tasks"]}
    assert {"train", "evaluate", "select", "register"} <= tasks, tasks
    wait_for_run = shots[1]  # docs/operating.md's picture shows a whole run
    if wait_for_run:
        state = wait_until(airflow, run_id, ("success", "failed"), RUN_TIMEOUT)
        assert state == "success", f"run {run_id} ended {state}; Airflow's logs: {airflow.logs}"
    else:  # it starts: the form's "Unpause on trigger" unpaused the DAG and the scheduler took the run
        wait_until(airflow, run_id, ("running", "success", "failed"), START_TIMEOUT)
    browser.driver.get(f"{airflow.url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id)}")
    browser.find("//button[starts-with(@aria-label, 'Show Graph')]", "the Graph button", FIRST_LOAD).click()
    browser.find("//*[contains(@class, 'react-flow__node')]", "the graph's first node")
    # top to bottom: the pipeline is long and narrow, left to right it is too small to read
    browser.find("//button[@aria-label='Options']", "the graph's Options button").click()
    browser.find("//button[@role='combobox'][@aria-labelledby=//label[normalize-space()='Graph Direction']/@id]",
                 "the Graph Direction select").click()
    browser.find("//*[@role='option'][normalize-space()='Top to Bottom']", "the 'Top to Bottom' option").click()
    from selenium.webdriver.common.keys import Keys

    browser.driver.find_element(browser.By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    tasks = {t.split(".")[0] for t in tasks}  # a task group (successive halving's rungs) is one node, collapsed

    def every_task(driver):
        found = driver.find_elements(browser.By.CSS_SELECTOR, ".react-flow__node")  # data-id: the task or group id
        return found if {n.get_attribute("data-id") for n in found} >= tasks else None

    nodes = browser.wait(f"a node for each of the {len(tasks)} tasks", every_task)
    shown = {n.get_attribute("data-id"): n.text for n in nodes}
    assert set(shown) == tasks, f"graph nodes {sorted(shown)} != the DAG's tasks {sorted(tasks)}"
    assert shown["train"].startswith("train [") and shown["evaluate"].startswith("evaluate ["), shown  # mapped
    if wait_for_run:
        browser.wait("every node to show its final state", lambda d: all(
            any(s in n.text for s in ("success", "skipped")) for n in nodes))
    browser.find("//button[@aria-label='Fit View']", "the graph's Fit View button").click()
    time.sleep(1)  # the fit animates
    browser.screenshot(shots[0] / "dag-graph.png")


def wait_until(airflow: AirflowServer, run_id: str, states: tuple[str, ...], timeout: float) -> str:
    """The run's state once it is one of `states`."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        status, run = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}")
        state = run.get("state") if status == 200 else state
        if state in states:
            return state
        time.sleep(3)
    pytest.fail(f"run {run_id} still {state} after {timeout:.0f} s, not {' or '.join(states)}; Airflow's logs: "
                f"{airflow.logs}")


def test_a_reviewer_approves_in_the_required_actions_page_and_the_grids_load(browser, airflow, shots, triggered):
    """A run with *Require a reviewer's approval* waits in `approval`; its Required actions page shows register's
    report with the interval and the grids, which the browser loads from make ui's MLflow server; Approve runs
    `promote` and makes the version champion, recorded as approved by the user who clicked."""
    first = triggered.get("run_id") or pytest.fail("no run was triggered (see the tests above)")
    wait_until(airflow, first, ("success", "failed"), RUN_TIMEOUT)  # one run at a time: the form's goes first
    conf = {key: value for _, _, key, _, value in RECIPE} | {
        "learning_rates": [1e-3], "require_approval": True, "force": True,
        "promotion_margin": -10}  # the tiny random evaluators cannot see a subject: no gain is real here
    status, run = airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    run_id, quoted = run["dag_run_id"], urllib.parse.quote(run["dag_run_id"])

    def approval_state() -> str | None:
        status, ti = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/approval")
        return ti.get("state") if status == 200 else None

    deadline = time.monotonic() + RUN_TIMEOUT
    while approval_state() != "awaiting_input":
        state = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quoted}")[1].get("state")
        assert time.monotonic() < deadline and state in ("queued", "running"), \
            f"run {run_id} is {state} and never asked for approval; Airflow's logs: {airflow.logs}"
        time.sleep(3)
    time.sleep(5)  # a person answers after the scheduler has taken in the parked task (Airflow 3.3.2 races sooner)
    browser.driver.get(f"{airflow.url}/dags/{DAG_ID}/runs/{quoted}/tasks/approval/required_actions?map_index=-1")
    browser.find("//*[contains(normalize-space(), 'Promote dog-sdxl-lora v')]", "the approval's subject", FIRST_LOAD)
    interval = browser.find("//p[contains(normalize-space(), '% interval')]", "the interval in the report")
    grids = browser.wait("the grids, loaded from MLflow", lambda d: [
        img for img in d.find_elements(browser.By.XPATH, "//img[contains(@src, '/get-artifact?path=review/grid')]")
        if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)] or None)
    assert len(grids) == 2  # one per evaluation prompt
    browser.scroll_to(interval, "start")  # the picture: the decision and its interval, the first grid below
    time.sleep(1)
    browser.screenshot(shots[0] / "approval.png")
    browser.scroll_to(browser.find("//button[normalize-space()='Approve']", "the Approve button")).click()
    assert wait_until(airflow, run_id, ("success", "failed"), RUN_TIMEOUT) == "success", airflow.logs
    status, ti = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/promote")
    assert ti["state"] == "success", ti
    from mlflow import MlflowClient

    store = airflow.logs.parent / "mlflow" / "mlflow.db"  # the fixture's DREAMLINE_HOME holds make ui's store
    champion = MlflowClient(f"sqlite:///{store}").get_model_version_by_alias("dog-sdxl-lora", "champion")
    assert (champion.tags["champion.action"], champion.tags["champion.by"]) == ("approved", airflow.username)

// Start-up: the two views (#chat, #dashboard), the API key dialog, the model list and the
// stats poller that feeds the status line and the dashboard.

import { apiKey, getJSON, handleUnauthorized, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { Dashboard } from "./dashboard.js";

const FAST_MS = 300;     // dashboard on screen: a few readings a second
const SLOW_MS = 1000;    // chat on screen: the status line only

const $ = (id) => document.getElementById(id);

const chat = new Chat();
const dashboard = new Dashboard();
let pollTimer = null;
let needKey = false;

function currentView() {
  return location.hash === "#dashboard" ? "dashboard" : "chat";
}

function showView() {
  const view = currentView();
  for (const name of ["chat", "dashboard"]) {
    $(`view-${name}`).hidden = name !== view;
    const tab = $(`tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.body.dataset.view = view;
  schedulePoll(0);
}

function note(text) {
  $("status-note").textContent = text;
}

// ---- the API key ---------------------------------------------------------------
function askForKey(message) {
  needKey = true;
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-error").hidden = !message;
  note("API key needed");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

handleUnauthorized(() => askForKey(apiKey() ? "The server refused this key." : ""));

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setApiKey($("key-input").value.trim());
  $("key-input").value = "";
  $("key-dialog").close();
  needKey = false;
  note("");
  loadModels();
  schedulePoll(0);
});
$("key-forget").addEventListener("click", () => {
  setApiKey("");
  $("key-input").value = "";
});
$("key-button").addEventListener("click", () => askForKey(""));

// ---- models and stats ----------------------------------------------------------
async function loadModels() {
  try {
    const models = (await getJSON("/v1/models")).data;
    chat.setModels(models);
    dashboard.adapters = models.filter((m) => m.parent).map((m) => m.id);
    chat.setNtokens((await getJSON("/ui/vocab")).ntokens);
  } catch (err) {
    if (err.status === 401) return;          // the key dialog is open
    note(err.status === 503 ? "model loading…" : `models: ${err.message}`);
    setTimeout(loadModels, 1000);
  }
}

function schedulePoll(delay) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, delay);
}

async function poll() {
  const onDashboard = currentView() === "dashboard";
  if (needKey || document.hidden) return;   // resumed by the key dialog or visibilitychange
  try {
    const stats = await getJSON("/ui/stats");
    $("status-running").textContent = String(stats.engine.num_running ?? "–");
    $("status-waiting").textContent = String(stats.engine.num_waiting_requests ?? "–");
    if (!needKey) note("");
    dashboard.update(stats, onDashboard);
  } catch (err) {
    if (err.status === 401) return;
    note(err.status === 503 ? "model loading…" : `stats: ${err.message}`);
  }
  schedulePoll(onDashboard ? FAST_MS : SLOW_MS);
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) schedulePoll(0); });
window.addEventListener("hashchange", showView);
showView();
loadModels();

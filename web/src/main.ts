// Entry point: the app model, the interface, and the browser's signals.
import { App } from "./app";
import { UI } from "./ui";

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const app = new App(wsUrl);
new UI(app, document.getElementById("app")!);
window.addEventListener("online", () => app.reconnect());
window.addEventListener("offline", () => app.wentOffline());
document.addEventListener("visibilitychange", () => app.setPresence(document.hidden ? "away" : "online"));
void app.start();
(window as unknown as { sovereign: App }).sovereign = app; // for debugging and tests

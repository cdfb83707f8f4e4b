"""The admin listener (SPEC §10, §12.23-§12.25, §12.28): a thin aiohttp shell over
:class:`sovereign.services.admin.AdminService`, in the server's own process and event
loop, started and stopped by ``server.App``.

- ``http``: routes, deny-by-default authentication, CSRF, JSON errors, the panel's files;
- ``metrics``: the Prometheus collector that reads the plain counters at scrape time;
- ``timeseries``: per-minute samples for the dashboard's charts (last hour, in memory);
- ``openapi``: the OpenAPI document served at ``/admin/api/openapi.json``;
- ``static/``: the browser panel (plain HTML, CSS and ES modules; no build step).
"""

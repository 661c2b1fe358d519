"""The web app: dashboard, job pages, viewer, upload and a JSON API, run by `rtnode serve` in its own process."""

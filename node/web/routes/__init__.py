"""The web app's routes by area, each an APIRouter that `node.web.app.create_app` includes."""

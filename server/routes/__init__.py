"""One APIRouter per feature; ``upload`` is the streaming multipart reader /caption uses."""

from capguard.server.routes.caption import router as caption_router
from capguard.server.routes.checkpoints import router as checkpoints_router
from capguard.server.routes.evaluations import router as evaluations_router
from capguard.server.routes.health import router as health_router
from capguard.server.routes.metrics import router as metrics_router
from capguard.server.routes.ui import router as ui_router

__all__ = ["caption_router", "checkpoints_router", "evaluations_router", "health_router", "metrics_router",
           "ui_router"]

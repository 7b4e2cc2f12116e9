"""The inotify monitor behind OMERO.fs's MonitorServer.

``MonitorServer`` (the component) serves ``MonitorServer.*`` over RPC; ``Monitor`` is
one monitor's lifecycle and loop; ``Translator`` (pure) turns raw inotify events into
Create/Modify/Delete/System; ``Filters`` decides what is reported.
"""

from ._filters import Filters
from ._monitor import Monitor, MonitorSpec
from ._server import MonitorServer
from ._translate import Translator

__all__ = ["Filters", "Monitor", "MonitorSpec", "MonitorServer", "Translator"]

"""fsagent: move instrument data off lab machines safely.

The public surface is small on purpose:

* ``fsagent.cli.main`` — the ``fsagent`` command.
* ``fsagent.config.Config`` / ``load_config`` — every setting, its default and its check.
* ``fsagent.agent.run_agent`` — the trio entry point that owns every task.

Everything else lives in private-ish modules named after what they own; the README's
architecture section maps behaviours to modules.
"""

__version__ = "0.1.0"

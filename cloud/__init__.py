"""edgefleet cloud: registry, bundles, TUF trust, deployments, telemetry and the REST console."""

import sys

if sys.version_info < (3, 11):  # tomllib, and what the cloud is tested on; the agent and the CLI run on 3.10
    raise ImportError(f"the edgefleet cloud needs Python 3.11 or newer, this is {sys.version.split()[0]}; "
                      "the agent and the fleet CLI run on 3.10")

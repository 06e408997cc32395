"""The fleet, host side: publishing bundles and signed desired state (``publish``), the rollout
controller (``controller``) with its SQLite state (``db``) and broker link (``link``), and the
device simulator (``simulate``)."""

from edge_runtime.fleet.publish import PREFIX, bundle_ref, desired_topic, publish_bundle, publish_desired

__all__ = ["PREFIX", "bundle_ref", "desired_topic", "publish_bundle", "publish_desired"]

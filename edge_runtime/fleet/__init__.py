"""The fleet controller (host side): rollouts over MQTT through signed desired state."""

from edge_runtime.contracts.fleet import PREFIX, desired_topic
from edge_runtime.fleet.publish import bundle_ref, publish_bundle, publish_desired

__all__ = ["PREFIX", "bundle_ref", "desired_topic", "publish_bundle", "publish_desired"]

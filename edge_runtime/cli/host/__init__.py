"""Host-side commands (packer, fleet controller, device images, demo): absent from the device binary."""

"""On-device generation over MQTT v5: the service (`edgekit serve`) and a client for other nodes.

    protocol.py    topic layout, JSON message schemas (version 1), request validation
    journal.py     sqlite journal: accepted requests and unacknowledged replies survive a crash
    connection.py  broker URL, TLS, credentials -> a configured paho client
    service.py     the device side: validate, queue, generate on one worker thread, publish
    client.py      ask a device or the fleet; plain call and streaming iterator

The wire format is documented in docs/mqtt.md.
"""

from edgekit.device.mqtt.client import Answer, Client, Pending, RequestError
from edgekit.device.mqtt.connection import BrokerConfig
from edgekit.device.mqtt.journal import JournalError
from edgekit.device.mqtt.protocol import ProtocolError, Topics
from edgekit.device.mqtt.service import Limits, Service, ServiceConfig

__all__ = ["Answer", "BrokerConfig", "Client", "JournalError", "Limits", "Pending", "ProtocolError", "RequestError",
           "Service", "ServiceConfig", "Topics"]

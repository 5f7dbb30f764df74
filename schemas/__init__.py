"""The contract on every topic: Avro schemas, the records they describe, and the codec."""

"""stockflow: an event-sourced CQRS order-intake pipeline on Kafka, Faust and Redis."""

//! Integration tests: real redis-server processes, real HTTP servers and
//! clients, and the `anteroom` binary run as a real process. One binary so
//! everything links once.

mod canary;
mod chaos;
mod cli;
mod clocks;
mod cluster;
mod config;
mod conformance;
mod dead_letters;
mod failures;
mod faults;
mod hostile;
mod hostile_inputs;
mod httpbin;
mod lifecycle;
mod load;
mod logs;
mod lost_replies;
mod maintenance;
mod many;
mod metrics;
mod node_apps;
mod operations;
mod outages;
mod pause;
mod playbooks;
mod pressure;
mod priority;
mod python;
mod python_apps;
mod reliability;
mod restarts;
mod round_trip;
mod routing;
mod ruby_apps;
mod security;
mod sentinel;
mod status_page;
mod streaming;
mod support;
mod tls;
mod upgrade;
mod uploads;
mod upstreams;
mod websockets;

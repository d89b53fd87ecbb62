use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

/// vitalmq patch 11: the client id of the connection that published a message, kept
/// with each stored copy so that a No Local subscription (MQTT 5 3.8.3.1,
/// MQTT-3.8.3-3) can leave out its own client's messages. Shared, one allocation per
/// connection: storing a message clones the pointer, not the string.
pub(crate) type Origin = Arc<str>;

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
    pub(crate) origin: Origin,
}

impl PublishData {
    pub(crate) fn new(
        publish: Publish,
        properties: Option<PublishProperties>,
        origin: Origin,
    ) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin,
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    /// vitalmq patch 12: takes the parked request of connection `id` for subscription
    /// `filter` (the filter as subscribed, `$share/...` included) on log `filter_idx`,
    /// so that a SUBSCRIBE to a filter the connection already holds can replace its
    /// options.
    pub(crate) fn take_waiter(
        &mut self,
        id: ConnectionId,
        filter_idx: FilterIdx,
        filter: &str,
    ) -> Option<DataRequest> {
        let waiters = self.native.get_mut(filter_idx)?.waiters.get_mut();
        let index = waiters
            .iter()
            .position(|(conn_id, request)| *conn_id == id && request.filter == filter)?;
        waiters.remove(index).map(|(_, request)| request)
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                let v: Vec<usize> = self
                    .filter_indexes
                    .iter()
                    .filter(|(filter, _)| matches(topic, filter))
                    .map(|(_, filter_idx)| *filter_idx)
                    .collect();

                if !v.is_empty() {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);

                // Match new filter to existing topics and add to publish_filters if it matches
                for (topic, filters) in publish_filters.iter_mut() {
                    if matches(topic, filter) {
                        filters.push(idx);
                    }
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    /// Reads up to `len` messages of the log at `offset`, leaving out expired ones and
    /// (vitalmq patch 11, No Local) those published by the client `exclude_origin`.
    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
        exclude_origin: Option<&str>,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            if exclude_origin.is_some_and(|me| *pubdata.origin == *me) {
                return false;
            }

            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
        origin: Origin,
    ) {
        let data = PublishData::new(publish, publish_properties, origin);
        self.retained_publishes.insert(topic, data);
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    /// vitalmq patch 8: the retained messages matching `filter` whose topic sorts after
    /// `after`, in topic order, at most `limit` of them, and whether more remain, so a
    /// subscription gets every retained message over several reads instead of the
    /// first read's worth.
    pub fn read_retained_messages(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(Topic, PubWithProp)>, bool) {
        self.read_retained_messages_at(filter, after, limit, Instant::now())
    }

    /// `read_retained_messages` as of `now`.
    ///
    /// vitalmq patch 17: the Message Expiry Interval sent with a retained message is
    /// what remains of the published one at `now` (MQTT 5 3.3.2.3.3), computed on the
    /// returned copy; the stored message keeps the published interval and its arrival
    /// time. rumqttd subtracted the age from the stored interval on every read, so each
    /// read took the whole age off again and a message read often expired early.
    fn read_retained_messages_at(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> (Vec<(Topic, PubWithProp)>, bool) {
        trace!(info = "reading retain msg", filter = &filter);

        // discard expired retained messages
        self.retained_publishes
            .retain(|_, pubdata| expiry_at(pubdata, now) != Expiry::Expired);

        // no need to include timestamp when returning
        let mut topics: Vec<&Topic> = self
            .retained_publishes
            .keys()
            .filter(|topic| after.map_or(true, |after| topic.as_str() > after))
            .filter(|topic| matches(topic, filter))
            .collect();
        topics.sort_unstable();
        let more = topics.len() > limit;
        let read = topics
            .into_iter()
            .take(limit)
            .filter_map(|topic| {
                let p = self.retained_publishes.get(topic)?;
                let mut properties = p.properties.clone();
                if let Expiry::Left(remaining) = expiry_at(p, now) {
                    // set message_expiry_interval to (original value - time spent waiting in server)
                    // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                    if let Some(properties) = properties.as_mut() {
                        properties.message_expiry_interval = Some(remaining);
                    }
                }
                Some((topic.clone(), (p.publish.clone(), properties)))
            })
            .collect();
        (read, more)
    }
}

/// vitalmq patch 17: where a stored message stands against its Message Expiry Interval.
#[derive(Debug, PartialEq, Eq)]
enum Expiry {
    /// No Message Expiry Interval: the message never expires.
    Never,
    Expired,
    /// Seconds left.
    Left(u32),
}

fn expiry_at(pubdata: &PublishData, now: Instant) -> Expiry {
    let Some(interval) = pubdata
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
    else {
        return Expiry::Never;
    };
    let time_spent = now.saturating_duration_since(pubdata.timestamp).as_secs();
    let time_spent = u32::try_from(time_spent).unwrap_or(u32::MAX);
    match interval.checked_sub(time_spent) {
        Some(left) if left > 0 => Expiry::Left(left),
        _ => Expiry::Expired,
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        let waiters = Waiters::with_capacity(10);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // vitalmq patch 16: the QoS 2 publishes waiting for PUBREL are session state, kept
    // by packet id in `Connection::unreleased`, no longer here (this log is new at
    // every connect).
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        // vitalmq patch 1: grow on demand (see iobufs::Incoming::new).
        AckLog {
            committed: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::protocol::{Publish, PublishProperties};
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;
    use std::time::{Duration, Instant};

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    fn datalog() -> DataLog {
        DataLog::new(RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        })
        .unwrap()
    }

    fn expiry_read(data: &mut DataLog, now: Instant) -> Vec<Option<u32>> {
        let (read, _) = data.read_retained_messages_at("alerts/#", None, 10, now);
        read.into_iter()
            .map(|(_, (_, props))| props.and_then(|p| p.message_expiry_interval))
            .collect()
    }

    /// MQTT 5 3.3.2.3.3 (Message Expiry Interval): a retained message is sent with the
    /// published interval minus the time it waited, and is kept until the whole
    /// interval has passed, however often it is read (vitalmq patch 17: rumqttd took
    /// the message's whole age off the stored interval on every read).
    #[test]
    fn mqtt5_3_3_2_3_3_retained_message_expiry_counts_down_once_per_read() {
        let mut data = datalog();
        let publish = Publish::new("alerts/a", "x", true);
        let props = PublishProperties {
            message_expiry_interval: Some(100),
            ..Default::default()
        };
        data.insert_to_retained_publishes(publish, Some(props), "alerts/a".into(), "c".into());
        let published = data.retained_publishes["alerts/a"].timestamp;

        let at = |secs| published + Duration::from_secs(secs);
        assert_eq!(expiry_read(&mut data, at(30)), vec![Some(70)]);
        assert_eq!(expiry_read(&mut data, at(60)), vec![Some(40)]);
        assert_eq!(expiry_read(&mut data, at(75)), vec![Some(25)]);
        assert_eq!(expiry_read(&mut data, at(99)), vec![Some(1)]);
        // The stored message keeps the published interval.
        let stored = data.retained_publishes["alerts/a"].properties.clone();
        assert_eq!(stored.and_then(|p| p.message_expiry_interval), Some(100));
        // Expired at 100 s, and then gone from the store.
        assert_eq!(expiry_read(&mut data, at(100)), Vec::<Option<u32>>::new());
        assert!(data.retained_publishes.is_empty());
    }

    #[test]
    fn a_retained_message_without_expiry_is_read_unchanged() {
        let mut data = datalog();
        let publish = Publish::new("alerts/b", "x", true);
        data.insert_to_retained_publishes(publish, None, "alerts/b".into(), "c".into());
        let published = data.retained_publishes["alerts/b"].timestamp;
        let much_later = published + Duration::from_secs(u64::from(u32::MAX) + 10);
        assert_eq!(expiry_read(&mut data, much_later), vec![None]);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
